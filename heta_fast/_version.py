"""The package version (one owner: ``heta_fast.__version__`` and the job records read it here)."""

__version__ = "0.1.0"
