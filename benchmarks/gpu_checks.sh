#!/usr/bin/env bash
# The GPU checks, as one run on a lent CUDA machine (BENCHMARKS.md, "GPU"): the kernel tests with
# compiled Triton, the backends' end-to-end parity and seconds, then the kernel benchmark.
#
#     bash benchmarks/gpu_checks.sh OUTDIR
#
# Runs from the repository root with whatever torch/triton/transformers the machine has; nothing
# is installed (heta_fast imports from the root: heta_fast/kernels links to kernels/). Each step
# has its own time limit so a slow one cannot starve the next; the logs and JSON go to OUTDIR.
set -uo pipefail
out="${1:?usage: gpu_checks.sh OUTDIR}"
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt"
timeout "${KERNEL_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_backends.py \
    2>&1 | tee "$out/pytest_gpu.log" | tail -n 15
timeout "${BACKENDS_S:-150}" python3 -m benchmarks.bench_backends_gpu --json "$out/backends_gpu.json" 2>&1 \
    | tee "$out/backends_gpu.log"
timeout "${KERNELS_S:-200}" python3 -m benchmarks.bench_kernels_gpu --quick --json "$out/kernels_gpu.json" 2>&1 \
    | tee "$out/kernels_gpu.log"
