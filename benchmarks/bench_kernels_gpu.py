"""Time the Triton kernels of ``heta_fast.kernels`` against their torch references on a GPU.

    python benchmarks/bench_kernels_gpu.py [--quick] [--json results.json]

Sizes follow real vocabularies and hidden sizes (SmolLM2 V=49152 d=2048, Llama 3 V=128256 d=4096 and
d=8192, Qwen2.5 V=151936 d=3584; B up to 256). Each row reports the median time of kernel and
reference, the speedup, the kernel's achieved bandwidth (minimum bytes it must move / time) and
FLOP/s, each as a fraction of this device's peak measured in the same run (a large bf16 and fp32
matmul, a device-to-device copy), the extra memory each side allocated, and the kernel's
relative error against the reference. Without a CUDA device it prints a message and exits 0.
``--smoke`` runs tiny sizes through Triton's CPU interpreter (checks the script, times nothing real).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU interpreter (no GPU needed)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads

import torch  # noqa: E402

if not ARGS.smoke and not torch.cuda.is_available():
    print("bench_kernels_gpu: no CUDA device here; nothing to time (use --smoke to exercise the script on CPU).")
    sys.exit(0)

import heta_fast.backends.triton_kernels as K  # noqa: E402
from benchmarks.common import commit, load_average, machine  # noqa: E402
from heta_fast.kl import linear_kl  # noqa: E402
from heta_fast.rng import rademacher  # noqa: E402
from heta_fast.sensitivity.exact import block_l1_mean  # noqa: E402

DEVICE = torch.device("cpu" if ARGS.smoke else "cuda")
REPS = ARGS.reps or (1 if ARGS.smoke else 5 if ARGS.quick else 20)
GIB = 2**30


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


_flush = torch.empty(256 * 2**20 if DEVICE.type == "cuda" else 1, dtype=torch.int8, device=DEVICE)


def bench(fn, reps: int = REPS, warmup: int = 2) -> float:
    """Median seconds of ``fn()``; the L2 cache is flushed before each run so weights come from HBM."""
    for _ in range(0 if ARGS.smoke else warmup):
        fn()
    times = []
    for _ in range(reps):
        _flush.zero_()
        if DEVICE.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def extra_memory(fn) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was live before it (CUDA only; 0 elsewhere)."""
    if DEVICE.type != "cuda":
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    sync()
    del result
    return torch.cuda.max_memory_allocated() - before


def measure_peaks() -> dict[str, float]:
    """Peak matmul FLOP/s (bf16; fp32 with TF32 off) and copy bandwidth (bytes read + written per s)."""
    n = 256 if ARGS.smoke else 8192
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=DEVICE).to(dtype)
        b = torch.randn(n, n, device=DEVICE).to(dtype)
        peaks[f"flops_{name}"] = 2 * n**3 / bench(lambda a=a, b=b: a @ b, reps=max(3, REPS // 2))
        del a, b
    src = torch.empty((1 if ARGS.smoke else 2 * 1024) * 2**20, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    peaks["bandwidth"] = 2 * src.numel() / bench(lambda: dst.copy_(src), reps=max(3, REPS // 2))
    return peaks


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def row(kernel: str, shape: str, t_kernel: float, t_ref: float, nbytes: float, flops: float, flop_peak: float,
        mem_kernel: int, mem_ref: int, err: float, peaks: dict[str, float]) -> dict:
    return {
        "kernel": kernel, "shape": shape, "ms_kernel": 1e3 * t_kernel, "ms_torch": 1e3 * t_ref,
        "speedup": t_ref / t_kernel, "GBps": nbytes / t_kernel / 1e9, "bw_frac": nbytes / t_kernel / peaks["bandwidth"],
        "TFLOPs": flops / t_kernel / 1e12, "flop_frac": flops / t_kernel / flop_peak if flop_peak else 0.0,
        "MiB_kernel": mem_kernel / 2**20, "MiB_torch": mem_ref / 2**20, "rel_err": err,
    }


def bench_kl(peaks: dict[str, float]) -> list[dict]:
    if ARGS.smoke:
        configs = [(300, 32, 4, torch.bfloat16), (300, 32, 4, torch.float32)]
    else:
        vd = [(49152, 2048), (128256, 4096), (151936, 3584), (128256, 8192)]
        bs = [1, 256] if ARGS.quick else [1, 32, 256]
        configs = [(v, d, b, torch.bfloat16) for v, d in vd for b in bs]
        configs += [(128256, 4096, 256, torch.float32)]
    rows = []
    for v, d, b, dtype in configs:
        rows += _bench_kl_case(v, d, b, dtype, peaks)
    return rows


def _bench_kl_case(v: int, d: int, b: int, dtype: torch.dtype, peaks: dict[str, float]) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weight = (torch.randn(v, d, device=DEVICE, generator=g) / d**0.5).to(dtype)
    hidden = torch.randn(b, d, device=DEVICE, generator=g).to(dtype)
    log_p = torch.log_softmax(torch.randn(v, device=DEVICE, generator=g) * 2, dim=0)
    elt = weight.element_size()
    nbytes = v * d * elt + b * d * elt + 4 * v + 4 * b  # the weight once, at minimum
    flop_peak = peaks["flops_fp32" if dtype == torch.float32 else "flops_bf16"]

    def ref_fn():
        return linear_kl(hidden, weight, None, log_p)

    ref, t_ref, mem_ref = ref_fn(), bench(ref_fn), extra_memory(ref_fn)
    rows = []
    for prec in ["ieee", "tf32x3"] if dtype == torch.float32 else ["ieee"]:
        def run(prec=prec):
            return K.fused_linear_kl(hidden, weight, None, log_p, fp32_precision=prec)

        name = "fused_linear_kl" + (f"[{prec}]" if dtype == torch.float32 else "")
        rows.append(row(name, f"B={b} V={v} d={d} {str(dtype)[6:]}", bench(run), t_ref, nbytes, 2.0 * b * v * d,
                        flop_peak, extra_memory(run), mem_ref, rel_err(run(), ref), peaks))
        print_row(rows[-1])
    return rows


def bench_hvp(peaks: dict[str, float]) -> list[dict]:
    m = 10
    if ARGS.smoke:
        configs = [(8, 64, None, torch.float32), (8, 64, 16, torch.bfloat16)]
    else:
        configs = [(n, d, None, dt) for n in (512, 2048) for d in (2048, 4096, 8192)
                   for dt in (torch.bfloat16, torch.float32)]
        configs += [(25, 4096, 512, torch.bfloat16), (25, 8192, 256, torch.bfloat16)]  # whole HVPs [B, T, d]
        if ARGS.quick:
            configs = configs[::3] + configs[-1:]
    rows = []
    for n, d, t, dtype in configs:
        rows.append(_bench_hvp_case(n, m, d, t, dtype, peaks))
        print_row(rows[-1])
    return rows


def _bench_hvp_case(n: int, m: int, d: int, t: int | None, dtype: torch.dtype, peaks: dict[str, float]) -> dict:
    b = n * m
    positions = torch.arange(n, device=DEVICE).repeat_interleave(m)
    hvp = torch.randn(*((b, d) if t is None else (b, t, d)), device=DEVICE).to(dtype)
    nbytes = b * d * hvp.element_size() + 8 * b + 4 * n  # only the probes' own blocks are read

    def run():
        return K.hvp_block_l1_mean(hvp, positions, n, m)

    def ref_fn():
        return block_l1_mean(hvp, positions, n, m)

    label = f"B={b} d={d}" + (f" T={t}" if t else "") + f" {str(dtype)[6:]}"
    return row("hvp_block_l1_mean", label, bench(run), bench(ref_fn), nbytes, 2.0 * b * d, 0.0,
               extra_memory(run), extra_memory(ref_fn), rel_err(run(), ref_fn()), peaks)


def bench_probes(peaks: dict[str, float]) -> list[dict]:
    configs = [(16, 64)] if ARGS.smoke else [(5120, 4096), (20480, 8192)]
    rows = []
    for b, d in configs:
        positions = torch.arange(b, device=DEVICE) // 10
        samples = torch.arange(b, device=DEVICE) % 10
        def run(positions=positions, samples=samples, d=d):
            return K.rademacher_triton(12345, positions, samples, d, torch.bfloat16, DEVICE)

        def ref_fn(positions=positions, samples=samples, d=d):
            return rademacher(12345, positions, samples, d, torch.bfloat16, DEVICE)

        exact = torch.equal(run(), ref_fn())
        rows.append(row("rademacher_triton", f"B={b} d={d} bf16", bench(run), bench(ref_fn), 2.0 * b * d, 0.0, 0.0,
                        extra_memory(run), extra_memory(ref_fn), 0.0 if exact else float("inf"), peaks))
        print_row(rows[-1])
    return rows


HEADER = (f"{'kernel':<26}{'shape':<34}{'ms':>9}{'torch ms':>10}{'speedup':>9}{'GB/s':>8}{'%bw':>6}"
          f"{'TFLOP/s':>9}{'%flop':>7}{'MiB':>8}{'torch MiB':>10}{'rel err':>9}")


def print_row(r: dict) -> None:
    print(f"{r['kernel']:<26}{r['shape']:<34}{r['ms_kernel']:>9.3f}{r['ms_torch']:>10.3f}{r['speedup']:>9.2f}"
          f"{r['GBps']:>8.0f}{100 * r['bw_frac']:>6.0f}{r['TFLOPs']:>9.1f}{100 * r['flop_frac']:>7.0f}"
          f"{r['MiB_kernel']:>8.1f}{r['MiB_torch']:>10.1f}{r['rel_err']:>9.1e}", flush=True)


def main() -> None:
    ok, why = K.triton_status()
    if not ok:
        print(f"bench_kernels_gpu: Triton cannot run here: {why}")
        return
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (Triton interpreter)"
    peaks = measure_peaks()
    print(f"device: {name}; {why}")
    print(f"measured peaks: bf16 matmul {peaks['flops_bf16'] / 1e12:.0f} TFLOP/s, fp32 matmul "
          f"{peaks['flops_fp32'] / 1e12:.1f} TFLOP/s, copy {peaks['bandwidth'] / 1e9:.0f} GB/s (read + write)")
    print("%bw: minimum bytes moved / time vs the copy peak; %flop: vs the matmul peak of the input dtype; "
          "rel err: max |kernel - torch| / max |torch| (bf16 torch rounds its logits to bf16, the kernel does not)")
    print(HEADER)
    rows = bench_kl(peaks) + bench_hvp(peaks) + bench_probes(peaks)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"device": name, **commit(), "machine": machine(), "load_average": load_average(),
                       "peaks": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
