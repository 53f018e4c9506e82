# Metadata lives in pyproject.toml; this file keeps legacy `python setup.py develop` working.
from setuptools import setup

setup()
