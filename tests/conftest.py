"""Fixtures (a fresh random seed, each tiny model) and the Triton interpreter switch; helpers live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter mode is fixed when triton is first imported, and transformers imports it with
# its model classes: without a GPU, choose the interpreter now so the kernel tests can run on CPU.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from helpers import MODELS  # noqa: E402 - after TRITON_INTERPRET is chosen


@pytest.fixture
def fresh_seed(request) -> int:
    """A new seed every run (fresh random inputs); shown in the failure report."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"fresh seed: {seed}")
    return seed


@pytest.fixture(params=sorted(MODELS))
def model(request, fresh_seed):
    return MODELS[request.param](fresh_seed % 1000)
