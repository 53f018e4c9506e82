"""The backend registry: one entry per configurable name, triton's kernels built once, ``resolve``."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_llama

from heta_fast import pipeline
from heta_fast.backends import REGISTRY, TORCH_OPS, TRITON_OPS, Backend, resolve
from heta_fast.backends import triton_kernels as kernels
from heta_fast.config import BACKENDS, HETAConfig
from heta_fast.flops import component_flops
from heta_fast.kl import linear_kl
from heta_fast.model import CausalLM
from heta_fast.pipeline import Ops
from heta_fast.rng import rademacher
from heta_fast.sensitivity.exact import block_l1_mean


def test_every_configurable_name_but_auto_is_a_registered_backend():
    assert sorted(REGISTRY) == sorted(set(BACKENDS) - {"auto"})
    assert all(backend.name == name for name, backend in REGISTRY.items())


def test_the_fast_backends_differ_only_in_their_ops():
    assert TORCH_OPS == REGISTRY["torch"].ops
    assert (TORCH_OPS.linear_kl, TORCH_OPS.block_l1_mean, TORCH_OPS.rademacher) == (linear_kl, block_l1_mean,
                                                                                   rademacher)
    assert TRITON_OPS is REGISTRY["triton"].ops
    assert (TRITON_OPS.linear_kl, TRITON_OPS.block_l1_mean, TRITON_OPS.rademacher) == (
        kernels.fused_linear_kl, kernels.hvp_block_l1_mean, kernels.rademacher_triton)
    assert REGISTRY["reference"].ops is None


def test_a_backend_runs_the_pipeline_with_its_own_ops(fresh_seed):
    lm = CausalLM(tiny_llama(fresh_seed % 1000))
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return linear_kl(*args, **kwargs)

    backend = Backend("spy", Ops(linear_kl=counted))
    ids = random_ids(fresh_seed, 8)
    parts, _ = backend.run_many(lm, ids, [7, 4], HETAConfig(samples=1, seed=fresh_seed))
    assert calls and [len(p.I) for p in parts] == [7, 4]


def test_resolve_picks_torch_for_auto_on_cpu_and_refuses_unknown_names():
    lm = CausalLM(tiny_llama())
    assert resolve("auto", lm) is REGISTRY["torch"]
    assert resolve("reference", lm) is REGISTRY["reference"]
    with pytest.raises(ValueError, match=r"^unknown backend 'jax'; expected one of auto, reference, torch, triton$"):
        resolve("jax", lm)


def test_a_backend_runs_its_components(fresh_seed):
    lm = CausalLM(tiny_llama(fresh_seed % 1000))
    ids = random_ids(fresh_seed, 6)
    config = HETAConfig(samples=2, seed=fresh_seed)
    direct = pipeline.components(lm, ids, config)
    called = resolve("torch", lm)(lm, ids, config)
    for name in ("M", "S", "I"):
        assert torch.equal(getattr(direct, name), getattr(called, name))


def test_flop_counts_accept_every_configurable_backend():
    counts = {name: component_flops(CausalLM(tiny_llama()), 8, 2, backend=name) for name in BACKENDS}
    assert counts["auto"] == counts["torch"] == counts["triton"] != counts["reference"]
