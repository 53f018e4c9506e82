"""heta_fast: fast, exact HETA (Hessian-Enhanced Token Attribution) for decoder-only language models."""

from heta_fast._version import __version__
from heta_fast.api import HETA
from heta_fast.config import HETAConfig
from heta_fast.evaluation import evaluate
from heta_fast.jobs import attribute_dataset
from heta_fast.results import Aggregation, Attribution, MultiAttribution

__all__ = ["HETA", "HETAConfig", "Attribution", "MultiAttribution", "Aggregation", "attribute_dataset", "evaluate",
           "__version__"]
