"""The three backends end to end on a GPU: parity of ``triton`` and ``torch`` with ``reference``, then seconds.

    python -m benchmarks.bench_backends_gpu [--json results.json] [--smoke]

Parity: for tiny random GPT-2 and Llama models (the test suite's) and a random model of
SmolLM2-135M's shape (Llama, 30 layers, d = 576, 9 query / 3 key-value heads, V = 49152), each
backend's ``M``, ``S``, ``I`` and scores against the reference backend on the same device, fresh
random ids, the paper's definition and the library's defaults. The error is ``max|a - b| / max|b|``
per vector, as in ``tests/helpers.rel_err``; the CPU suite holds the same parity under the Triton
interpreter, this script holds it with compiled kernels.

Timing: seconds per attribution of each fast backend on the SmolLM2-shaped model for
``n`` context tokens (median of ``--reps`` after one warm-up), for ``--presets`` (``exact`` only up
to ``--exact-max`` tokens). Random weights cost what trained ones do; only the numbers differ.

Without a CUDA device it prints a message and exits 0; ``--smoke`` runs the tiny models on the CPU
under Triton's interpreter (checks the script, times nothing real).
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
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU interpreter (no GPU needed)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="context lengths to time")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per measurement")
    ap.add_argument("--presets", nargs="+", default=["exact", "fast", "fixed"], help="presets to time")
    ap.add_argument("--exact-max", type=int, default=128, help="time the exact preset up to this length only")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads

import torch  # noqa: E402

if not ARGS.smoke and not torch.cuda.is_available():
    print("bench_backends_gpu: no CUDA device here; nothing to run (use --smoke to exercise the script on CPU).")
    sys.exit(0)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.common import commit, load_average, machine  # noqa: E402
from heta_fast import HETA, HETAConfig  # noqa: E402
from heta_fast.backends import triton_status  # noqa: E402

DEVICE = torch.device("cpu" if ARGS.smoke else "cuda")


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=512, bos_token_id=0,
                                      eos_token_id=0, initializer_range=0.2, attn_implementation="eager")).eval()


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=3, intermediate_size=64, vocab_size=97, bos_token_id=1,
                                        max_position_embeddings=1024, initializer_range=0.2,
                                        attn_implementation="eager")).eval()


def smollm2_shaped(seed: int) -> LlamaForCausalLM:
    """SmolLM2-135M's architecture with random weights (the real one needs the GGUF converter here)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                        num_hidden_layers=30, intermediate_size=1536, vocab_size=49152,
                                        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                                        bos_token_id=1, eos_token_id=2, attn_implementation="eager")).eval()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def parity(seed: int) -> list[dict]:
    rows = []
    cases = [("tiny_gpt2", tiny_gpt2, 14), ("tiny_llama", tiny_llama, 14)]
    if not ARGS.smoke:
        cases.append(("smollm2_shaped", smollm2_shaped, 48))
    fast = ["torch"] + (["triton"] if triton_status(DEVICE)[0] else [])
    for name, build, n in cases:
        model = build(seed % 1000).to(DEVICE)
        heta = HETA(model)
        vocab = model.config.vocab_size
        ids = torch.randint(2, vocab, (n + 1,), generator=torch.Generator().manual_seed(seed)).tolist()
        for label, config in (("paper", HETAConfig.paper(samples=2, seed=seed % 1000)),
                              ("default", HETAConfig(samples=2, seed=seed % 1000))):
            ref = heta.attribute(ids, config=config.replace(backend="reference"))
            for backend in fast:
                got = heta.attribute(ids, config=config.replace(backend=backend))
                errs = {part: rel_err(getattr(got, part), getattr(ref, part)) for part in ("M", "S", "I", "scores")}
                row = {"model": name, "n": n, "config": label, "backend": backend, "seed": seed, **errs}
                print(f"parity {name:<15} n={n:<4} {label:<8} {backend:<7} "
                      + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
                rows.append(row)
        del heta, model
    return rows


def timing(seed: int) -> list[dict]:
    if ARGS.smoke:
        return []
    model = smollm2_shaped(seed % 1000).to(DEVICE)
    heta = HETA(model)
    rows = []
    for n in ARGS.lengths:
        ids = torch.randint(2, 49152, (n + 1,), generator=torch.Generator().manual_seed(seed + n)).tolist()
        for preset in ARGS.presets:
            if preset == "exact" and n > ARGS.exact_max:
                continue  # n m HVPs: 2.9 s at 128 tokens, ~16x the work at 512 (BENCHMARKS.md "GPU")
            for backend in ("torch", "triton"):
                config = HETAConfig.preset(preset, samples=2, seed=seed % 1000, backend=backend)
                heta.attribute(ids, config=config)  # warm-up: kernels compiled, allocator filled
                times = []
                for _ in range(ARGS.reps):
                    sync()
                    t0 = time.perf_counter()
                    heta.attribute(ids, config=config)
                    sync()
                    times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0
                row = {"model": "smollm2_shaped", "n": n, "preset": preset, "backend": backend,
                       "seconds": statistics.median(times), "all_seconds": times, "peak_bytes": peak}
                print(f"time   n={n:<5} {preset:<6} {backend:<7} {row['seconds']:.3f} s "
                      f"(runs {', '.join(f'{t:.3f}' for t in times)}), peak {peak / 2**30:.2f} GiB", flush=True)
                rows.append(row)
                if DEVICE.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; triton: {triton_status(DEVICE)[1]}; seed {seed}", flush=True)
    out = {"device": name, **commit(), "machine": machine(), "load_average": load_average(), "seed": seed,
           "torch": torch.__version__, "parity": parity(seed), "timing": timing(seed)}
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
