"""Benchmarks of heta_fast: ``python -m benchmarks.bench_smollm`` and ``pytest benchmarks --benchmark-enable``."""
