"""benchmarks/bench_methods: the Captum baselines compute what they claim, the table is complete (issue 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import random_ids, rel_err, tiny_gpt2, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("captum")

from benchmarks import bench_methods  # noqa: E402
from heta_fast import HETA  # noqa: E402


def test_occlusion_is_the_log_prob_drop_of_zeroing_each_token(fresh_seed):
    heta = HETA(tiny_llama(fresh_seed % 1000))
    ids = random_ids(fresh_seed, 10)
    got = bench_methods.captum_methods(heta)[bench_methods.OCCLUSION](ids)
    E = heta.lm.embed(ids[:-1])
    y = int(ids[-1])
    with torch.no_grad():
        def log_p(e):
            return torch.log_softmax(heta.lm.model(inputs_embeds=e[None]).logits[0, -1], -1)[y]
        want = torch.stack([log_p(E) - log_p(E.index_fill(0, torch.tensor([i]), 0.0)) for i in range(len(E))])
    assert got.shape == (9,)
    assert rel_err(got, want) < 1e-4


def test_integrated_gradients_are_complete(fresh_seed):
    """IG's attributions sum to f(E) - f(0) (the completeness axiom), up to the Riemann error.

    GPT-2: its position embeddings keep the first LayerNorm's input away from 0 along the path;
    a Llama's RMSNorm of alpha E jumps within alpha ~ sqrt(eps) / |E| of the zero baseline,
    which no 200-step rule resolves.
    """
    heta = HETA(tiny_gpt2(fresh_seed % 1000))
    ids = random_ids(fresh_seed, 10)
    name = next(k for k in bench_methods.captum_methods(heta) if "IntegratedGradients" in k)
    got = bench_methods.captum_methods(heta, ig_steps=200)[name.replace("50", "200")](ids)
    f = bench_methods.target_log_prob(heta, int(ids[-1]))
    E = heta.lm.embed(ids[:-1])[None]
    with torch.no_grad():
        gap = float(f(E) - f(torch.zeros_like(E)))
    assert got.shape == (9,)
    assert abs(float(got.sum()) - gap) < 0.02 * abs(gap) + 1e-3


def test_the_model_keeps_its_attention_kernel():
    heta = HETA(tiny_llama(0))
    model = heta.lm.model
    before = model.config._attn_implementation
    with bench_methods.attention_kernel(model, "sdpa"):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == before


def test_timings_are_interleaved_and_skips_are_left_out():
    calls = []
    methods = {name: (lambda ids, name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = bench_methods.time_methods(methods, torch.arange(3), repeats=2, skip=["b"], log=lambda _s: None)
    assert calls == ["a", "c", "a", "c"]
    assert sorted(out) == ["a", "c"] and all(len(row["seconds"]) == 2 for row in out.values())
