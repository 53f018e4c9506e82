"""heta_fast: fast, exact HETA (Hessian-Enhanced Token Attribution) for decoder-only language models."""

from heta_fast._version import __version__
from heta_fast.api import HETA
from heta_fast.attribution import Attribution, MultiAttribution
from heta_fast.config import HETAConfig
from heta_fast.jobs import attribute_dataset

__all__ = ["HETA", "HETAConfig", "Attribution", "MultiAttribution", "attribute_dataset", "__version__"]
