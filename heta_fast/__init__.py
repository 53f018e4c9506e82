"""heta_fast: fast, exact HETA (Hessian-Enhanced Token Attribution) for decoder-only language models."""

from heta_fast.api import HETA
from heta_fast.attribution import Attribution, MultiAttribution
from heta_fast.config import HETAConfig
from heta_fast.evaluation import evaluate

__all__ = ["HETA", "HETAConfig", "Attribution", "MultiAttribution", "evaluate"]
__version__ = "0.1.0"
