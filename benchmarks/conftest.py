"""Benchmarks are skipped unless pytest-benchmark is enabled: ``pytest benchmarks --benchmark-enable -q``.

The project's ``addopts`` disables benchmarking (``--benchmark-disable``) and collects only
``tests/``; ``--benchmark-enable`` overrides the former and naming the folder the latter.
Tests in this folder that do not use the ``benchmark`` fixture (checks of the benchmark's own
helpers) always run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_enable", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks --benchmark-enable`")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
