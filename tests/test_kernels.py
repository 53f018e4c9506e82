"""Triton kernels against their torch references, on the CPU through Triton's interpreter.

Shapes are drawn at random from ``HETA_KERNEL_TEST_SEED`` (a fresh seed each run when unset; the
seed is in every failure message). Outputs go into NaN-poisoned buffers so an element the kernel
never writes fails the comparison.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads: kernels then run on CPU tensors

import importlib.util
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import heta_fast.backends.triton_kernels as K  # noqa: E402
from heta_fast.kernels.probes import _probe_key, _probe_sign  # noqa: E402
from heta_fast.kl import linear_kl  # noqa: E402
from heta_fast.rng import rademacher  # noqa: E402
from heta_fast.sensitivity.exact import block_l1_mean  # noqa: E402

SEED = int(os.environ.get("HETA_KERNEL_TEST_SEED", random.SystemRandom().randrange(2**31)))
ON_CPU = K.triton_status()[0] and os.environ.get("TRITON_INTERPRET") not in (None, "0")
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = pytest.mark.skipif(not K.triton_status()[0], reason=K.triton_status()[1])


def rng(tag: int) -> random.Random:
    return random.Random(SEED * 1000 + tag)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Elementwise ``|a - e| <= rtol * |e|`` (NaN fails), with the seed in the message."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = (actual - expected).abs()
    ok = bool((err <= rtol * expected.abs()).all())  # NaN compares False
    rel = (err / expected.abs()).max().item() if actual.numel() else 0.0
    assert ok, f"{what}: max relative error {rel:.3g} > {rtol} (HETA_KERNEL_TEST_SEED={SEED})"


def poisoned(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# backend status and the missing-triton path


def test_status_reports_a_runnable_backend():
    ok, why = K.triton_status()
    assert ok and isinstance(why, str) and why


@pytest.fixture
def fresh_package():
    """A second, never-loaded copy of the kernels' front module (importing it needs no triton)."""
    name = "_heta_triton_kernels_copy"
    spec = importlib.util.spec_from_file_location(name, K.__file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[name]


def test_import_without_triton_then_clear_error(monkeypatch, fresh_package):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    pkg = fresh_package
    ok, why = pkg.triton_status()
    assert not ok and "triton is not installed" in why
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        pkg.fused_linear_kl(x, torch.zeros(3, 4), None, torch.zeros(3))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        pkg.hvp_block_l1_mean(x, torch.zeros(2, dtype=torch.long), 1, 1)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        pkg.rademacher_triton(0, [0], [0], 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_cuda_and_no_interpreter_is_reported(monkeypatch, fresh_package):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = fresh_package.triton_status()
    assert not ok and why == "no CUDA device and TRITON_INTERPRET is not set"


def test_interpreter_switched_on_after_triton_was_imported_is_reported():
    """Triton fixes compiled-or-interpreted builtins on import; a late TRITON_INTERPRET=1 is named, not crashed on."""
    script = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton.language  # what transformers' model classes do on import
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import heta_fast.backends.triton_kernels as K
        ok, why = K.triton_status()
        print(ok, why)
        try:
            K.fused_linear_kl(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(3))
        except RuntimeError as error:
            print("raised", error)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False triton was imported while TRITON_INTERPRET was unset"), run.stdout
    assert "raised heta_fast.kernels: the Triton backend cannot run here" in run.stdout


# ---------------------------------------------------------------------------------------------
# fused linear KL


def _kl_case(r: random.Random, b: int, v: int, d: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(r.randrange(2**31))
    hidden = torch.randn(b, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    bias_t = torch.randn(v, generator=g) if bias else None
    log_p = torch.log_softmax(2.0 * torch.randn(v, generator=g), dim=0)
    return [t if t is None else t.to(DEVICE) for t in (hidden, weight, bias_t, log_p)]


def _kl_shapes(tag: int, count: int) -> list[tuple[int, int, int]]:
    """Fixed corners (B = 1, V below / above / not a multiple of the tile) plus random draws."""
    r = rng(tag)
    shapes = [(1, 1, 8), (1, 129, 24), (3, 300, 40)]
    shapes += [(r.randint(1, 40), r.randint(2, 700), r.randint(1, 72)) for _ in range(count)]
    return shapes


@pytest.mark.parametrize("bias", [True, False])
def test_fused_kl_fp32_matches_reference(bias):
    r = rng(1 + bias)
    for b, v, d in _kl_shapes(10 + bias, 3):
        hidden, weight, bias_t, log_p = _kl_case(r, b, v, d, torch.float32, bias)
        out = poisoned(b)
        got = K.fused_linear_kl(hidden, weight, bias_t, log_p, out=out)
        assert got is out
        assert_rel(got, linear_kl(hidden, weight, bias_t, log_p), 1e-5, f"fp32 KL B={b} V={v} d={d}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kl_16bit_matches_reference(dtype):
    r = rng(3)
    for b, v, d in _kl_shapes(13, 2):
        hidden, weight, bias_t, log_p = _kl_case(r, b, v, d, dtype, True)
        got = K.fused_linear_kl(hidden, weight, bias_t, log_p, out=poisoned(b))
        # The torch reference rounds its logits to 16 bits; the kernel keeps them in fp32 ...
        assert_rel(got, linear_kl(hidden, weight, bias_t, log_p), 2e-2, f"{dtype} KL B={b} V={v} d={d}")
        # ... so against fp32 logits from the same 16-bit inputs it is as close as fp32 allows.
        exact = linear_kl(hidden.float(), weight.float(), bias_t, log_p)
        assert_rel(got, exact, 1e-5, f"{dtype} KL vs fp32 logits B={b} V={v} d={d}")


def test_fused_kl_tilings_splits_and_strides():
    """Small tiles force ragged vocabulary tails, ragged d steps and several vocabulary splits."""
    r = rng(4)
    b, v, d = r.randint(1, 9), r.randint(50, 200), r.randint(17, 40)
    hidden, weight, bias_t, log_p = _kl_case(r, b, v, d, torch.float32, True)
    expected = linear_kl(hidden, weight, bias_t, log_p)
    for splits in (1, 2, 3, 1000):
        got = K.fused_linear_kl(hidden, weight, bias_t, log_p, out=poisoned(b),
                                block_b=4, block_v=16, block_d=16, vocab_splits=splits)
        assert_rel(got, expected, 1e-5, f"splits={splits} B={b} V={v} d={d}")
    # Non-contiguous operands go in through their strides.
    wt = weight.t().contiguous().t()
    ht = hidden.t().contiguous().t()
    lp2 = torch.stack([log_p, log_p], dim=1)[:, 0]
    assert_rel(K.fused_linear_kl(ht, wt, bias_t, lp2, out=poisoned(b)), expected, 1e-5, "strided inputs")


def test_fused_kl_near_cancellation():
    """Q_b close to P with logits near 20: KL ~ 1e-7 .. 1e-5 is the difference of O(20) terms.

    Both fp32 paths sit on the same fp32 logits, whose rounding already moves the KL by ~1e-8 ..
    1e-7; the kernel's fp32 epilogue adds ~1e-7 at most (a plain fp32 log-sum-exp adds ~1.5e-6).
    """
    g = torch.Generator().manual_seed(SEED)
    b, v, d = 4, 500, 32
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 2.0
    h0 = torch.randn(d, generator=g, dtype=torch.float64)
    hidden = h0 + 1e-3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    log_p = torch.log_softmax(weight @ h0 + 20.0, dim=0)
    bias = torch.full((v,), 20.0, dtype=torch.float64)
    h32, w32, b32, lp32 = (t.float().to(DEVICE) for t in (hidden, weight, bias, log_p))
    truth = linear_kl(h32.double(), w32.double(), b32.double(), lp32.double()).cpu()  # same data, exact math
    got = K.fused_linear_kl(h32, w32, b32, lp32, out=poisoned(b)).cpu().double()
    err_torch = (linear_kl(h32, w32, b32, lp32).cpu().double() - truth).abs().max().item()
    err_kernel = (got - truth).abs().max().item()
    assert err_kernel <= 5e-7, (err_kernel, err_torch, truth.tolist(), SEED)


class _AllocationLog(TorchDispatchMode):
    """Records the size in bytes of every new storage an aten op creates."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.untyped_storage().nbytes())
        return result


def test_fused_kl_allocates_no_b_by_v_buffer():
    b, v, d = 64, 1500, 8  # B x V logits (384 kB in fp32) dwarf every legitimate buffer
    hidden, weight, bias_t, log_p = _kl_case(rng(5), b, v, d, torch.float32, True)
    with _AllocationLog() as log:
        got = K.fused_linear_kl(hidden, weight, bias_t, log_p)
    budget = 64 * (b + v)  # bytes: O(B + V) with a generous constant
    assert sum(log.sizes) <= budget, (sorted(log.sizes)[-5:], budget)
    assert max(log.sizes) < 4 * b * v
    with _AllocationLog() as ref_log:  # the detector sees the reference's B x V logits
        expected = linear_kl(hidden, weight, bias_t, log_p)
    assert max(ref_log.sizes) >= 4 * b * v
    assert_rel(got, expected, 1e-5, "allocation case")


# ---------------------------------------------------------------------------------------------
# HVP block reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole_hvp"])
def test_hvp_reduce_matches_reference(dtype, whole):
    r = rng(20 + whole)
    g = torch.Generator().manual_seed(r.randrange(2**31))
    for _ in range(3):
        n, m, d = r.randint(1, 9), r.randint(1, 4), r.randint(1, 2500)
        b = r.randint(1, n * m)
        positions = torch.randint(0, n, (b,), generator=g)
        shape = (b, r.randint(n, n + 3), d) if whole else (b, d)
        hvp = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
        out = poisoned(n)
        got = K.hvp_block_l1_mean(hvp, positions, n, m, out=out)
        assert got is out
        expected = block_l1_mean(hvp, positions, n, m)
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_rel(got, expected, rtol, f"{dtype} S n={n} m={m} d={d} B={b} whole={whole}")
        assert bool((got[expected == 0] == 0).all())


def test_hvp_reduce_strided_and_accumulated():
    r = rng(22)
    g = torch.Generator().manual_seed(r.randrange(2**31))
    n, m, d, t = 5, 3, 37, 7
    positions = torch.arange(n).repeat_interleave(m)
    base = torch.randn(n * m, d, t + 2, generator=g).to(DEVICE)
    hvp = base[..., 1:-1].transpose(1, 2)  # [B, T, d] view with d innermost-strided by T + 2
    expected = block_l1_mean(hvp, positions, n, m)
    assert_rel(K.hvp_block_l1_mean(hvp, positions, n, m, out=poisoned(n)), expected, 1e-5, "strided")
    # Two partial batches summed in place give the whole batch.
    out = poisoned(n)
    K.hvp_block_l1_mean(hvp[:4], positions[:4], n, m, out=out)
    K.hvp_block_l1_mean(hvp[4:], positions[4:], n, m, out=out, accumulate=True)
    assert_rel(out, expected, 1e-5, "accumulated")


# ---------------------------------------------------------------------------------------------
# probes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_probes_bit_exact(dtype):
    r = rng(30)
    seeds = [0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + [r.randrange(2**32) for _ in range(3)]
    for seed in seeds:
        b, d = r.randint(1, 6), r.choice([1, 7, 64, r.randint(2, 1500)])
        high = r.choice([16, 2**32])  # small context positions, and the whole 32-bit range
        positions = torch.tensor([r.randrange(high) for _ in range(b - 1)] + [high - 1])
        samples = torch.tensor([r.randrange(high) for _ in range(b)])
        out = poisoned(b, d, dtype=dtype)
        got = K.rademacher_triton(seed, positions, samples, d, dtype, DEVICE, out=out)
        assert got is out
        expected = rademacher(seed, positions, samples, d, dtype, DEVICE)
        assert torch.equal(got, expected), f"seed={seed} B={b} d={d} (HETA_KERNEL_TEST_SEED={SEED})"


def test_probes_strided_out_and_defaults():
    positions, samples = torch.tensor([3, 0, 9]), torch.tensor([1, 2, 0])
    out = poisoned(5, 3).t()  # [3, 5], column-major
    K.rademacher_triton(7, positions, samples, 5, torch.float32, DEVICE, out=out)
    assert torch.equal(out, rademacher(7, positions, samples, 5, device=DEVICE))
    assert torch.equal(K.rademacher_triton(7, positions.to(DEVICE), samples, 5),
                       rademacher(7, positions.to(DEVICE), samples, 5))


@triton.jit
def _probe_dot_kernel(x_ptr, pos_ptr, smp_ptr, y_ptr, seed, d, BLOCK: tl.constexpr):
    """``y_b = <r_{i_b, k_b}, x_b>`` with the probe's signs drawn in-kernel, never stored."""
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    key = _probe_key(seed, tl.load(pos_ptr + b), tl.load(smp_ptr + b))
    x = tl.load(x_ptr + b * d + j, mask=j < d, other=0.0)
    tl.store(y_ptr + b, tl.sum(_probe_sign(key, j) * x, axis=0))


def test_probe_helpers_usable_in_other_kernels():
    g = torch.Generator().manual_seed(SEED)
    b, d, seed = 4, 50, 2**32 - 5
    positions, samples = torch.randint(0, 2**32, (b,), generator=g), torch.randint(0, 10, (b,), generator=g)
    x = torch.randn(b, d, generator=g)
    y = poisoned(b)
    _probe_dot_kernel[(b,)](x.to(DEVICE), positions.to(DEVICE), samples.to(DEVICE), y, seed, d, BLOCK=64)
    expected = (rademacher(seed, positions, samples, d) * x).sum(dim=1)
    # a sum of d signed terms: fp32 summation error scales with sum |x|, not with the (cancelled) result
    err = (y.double().cpu() - expected.double()).abs()
    scale = x.double().abs().sum(dim=1)
    assert bool((err <= 1e-5 * scale).all()), \
        f"in-kernel probe dot: error {(err / scale).max().item():.3g} of sum |x| (HETA_KERNEL_TEST_SEED={SEED})"


# ---------------------------------------------------------------------------------------------
# input validation


def test_validation_errors():
    x, w, lp = (torch.zeros(*shape, device=DEVICE) for shape in ((2, 4), (3, 4), (3,)))
    cases = [
        (lambda: K.fused_linear_kl(x[0], w, None, lp), "hidden must be a 2-D"),
        (lambda: K.fused_linear_kl(x, w[:, :3], None, lp), "does not match hidden size"),
        (lambda: K.fused_linear_kl(x.double(), w.double(), None, lp), "hidden must be one of"),
        (lambda: K.fused_linear_kl(x, w.bfloat16(), None, lp), "must share a dtype"),
        (lambda: K.fused_linear_kl(x, w, torch.zeros(4, device=DEVICE), lp), r"bias must be a \[V=3\]"),
        (lambda: K.fused_linear_kl(x, w, None, lp[:2]), r"log_p must be a \[V=3\]"),
        (lambda: K.fused_linear_kl(x, w, None, lp, out=torch.zeros(3, device=DEVICE)), "out must be"),
        (lambda: K.fused_linear_kl(x, w, None, lp, fp32_precision="fast"), "fp32_precision"),
        (lambda: K.fused_linear_kl(x, w, None, lp.to("meta")), "share one device"),
        (lambda: K.hvp_block_l1_mean(x[0], torch.tensor([0]), 1, 1), r"\[B, d\] or \[B, T, d\]"),
        (lambda: K.hvp_block_l1_mean(x, torch.tensor([0, 1]), 1, 1), r"positions must lie in \[0, 1\)"),
        (lambda: K.hvp_block_l1_mean(x[:, None].expand(2, 2, 4), torch.tensor([0, 2]), 5, 1), "T=2"),
        (lambda: K.hvp_block_l1_mean(x, torch.tensor([0]), 1, 1), "1 entries for 2 HVP rows"),
        (lambda: K.hvp_block_l1_mean(x, torch.zeros(2), 1, 1), "integer tensor"),
        (lambda: K.hvp_block_l1_mean(x, torch.tensor([0, 0]), 1, 0), "samples must be >= 1, got 0"),
        (lambda: K.hvp_block_l1_mean(x.long(), torch.tensor([0, 0]), 1, 1), "hvp must be one of"),
        (lambda: K.rademacher_triton(0, [0, 1], [0], 4), "differ in shape"),
        (lambda: K.rademacher_triton(0, [-1], [0], 4), r"positions must lie in \[0, 2\*\*32\)"),
        (lambda: K.rademacher_triton(0, [0], [2**32], 4), r"samples must lie in \[0, 2\*\*32\)"),
        (lambda: K.rademacher_triton(-1, [0], [0], 4), r"seed must lie in \[0, 2\*\*32\)"),
        (lambda: K.rademacher_triton(0, [0], [0], 4, torch.int32), "dtype must be one of"),
        (lambda: K.rademacher_triton(0, [0], [0], -2), "d must be >= 0, got -2"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_empty_batches():
    x, w, lp = (torch.zeros(*shape, device=DEVICE) for shape in ((0, 4), (3, 4), (3,)))
    assert K.fused_linear_kl(x, w, None, lp).shape == (0,)
    s = K.hvp_block_l1_mean(x, torch.zeros(0, dtype=torch.long), 3, 2)
    assert torch.equal(s.cpu(), torch.zeros(3))
    assert K.rademacher_triton(0, [], [], 4, device=DEVICE).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# the same kernels compile for a GPU (ahead of time: needs triton's NVIDIA backend, not a GPU)

_AOT = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import heta_fast.kernels.linear_kl, heta_fast.kernels.hvp_reduce, heta_fast.kernels.probes
    F, H, P = (sys.modules["heta_fast.kernels." + m] for m in ("linear_kl", "hvp_reduce", "probes"))
    kl_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "lp_ptr": "*fp32", "ws_ptr": "*fp64"}
    kl_sig.update({k: "i32" for k in ("B", "V", "D", "tiles_per_split", "s_hb", "s_hd", "s_wv", "s_wd",
                                       "s_bias", "s_lp")})
    consts = dict(HAS_BIAS=True, INPUT_PRECISION="ieee", UPCAST=False, BLOCK_B=64, BLOCK_V=128, BLOCK_D=64)
    fp32 = dict(kl_sig, h_ptr="*fp32", w_ptr="*fp32")
    jobs = [
        (F._kl_partial_kernel, kl_sig, consts),
        (F._kl_partial_kernel, fp32, dict(consts, INPUT_PRECISION="tf32x3", BLOCK_B=16, BLOCK_D=32)),
        (F._kl_combine_kernel, {"ws_ptr": "*fp64", "out_ptr": "*fp32", "B": "i32", "S": "i32", "stride_o": "i32"},
         dict(BLOCK_B=128)),
        (H._block_l1_kernel, {"hvp_ptr": "*bf16", "pos_ptr": "*i64", "out_ptr": "*fp32", "d": "i32",
                              "inv_m": "fp32", "stride_b": "i64", "stride_t": "i32", "stride_d": "i32",
                              "stride_o": "i32"}, dict(HAS_T=True, BLOCK_D=1024)),
        (P._rademacher_kernel, {"out_ptr": "*bf16", "pos_ptr": "*i64", "smp_ptr": "*i64", "seed": "i64",
                                "d": "i32", "stride_ob": "i32", "stride_od": "i32"}, dict(BLOCK_D=1024)),
    ]
    for fn, sig, const in jobs:
        sig = dict(sig, **{k: "constexpr" for k in const})
        compiled = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "num_stages": 3})
        assert "cubin" in compiled.asm, fn
    print("compiled", len(jobs))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend")
def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=150)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 5" in proc.stdout
