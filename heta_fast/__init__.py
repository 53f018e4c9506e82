"""heta_fast: fast, exact HETA (Hessian-Enhanced Token Attribution) for decoder-only language models."""

from heta_fast.api import HETA
from heta_fast.attribution import Attribution, MultiAttribution
from heta_fast.config import HETAConfig

__all__ = ["HETA", "HETAConfig", "Attribution", "MultiAttribution"]
__version__ = "0.1.0"
