"""The model families heta_fast supports: one owner for the list, the tests and the README.

A family is a transformers ``model_type``. Each one here is in ``tests/test_families.py``'s matrix,
where a tiny random model of it is checked against explicit computations on every backend
(context longer than its sliding window, where it has one); a model of any other type is refused
with a ``TypeError`` before any work. ``python -m heta_fast.families`` prints the README table.
"""

from __future__ import annotations

# model_type -> (name people use, what the adapter has to know about it)
SUPPORTED: dict[str, tuple[str, str]] = {
    "gpt2": ("GPT-2", "fused Conv1D qkv, absolute positions"),
    "gpt_bigcode": ("GPTBigCode (StarCoder)", "multi-query attention, fused nn.Linear qkv"),
    "gpt_neox": ("GPT-NeoX (Pythia)", "per-head interleaved qkv, parallel residual"),
    "llama": ("Llama (SmolLM2)", "grouped-query attention"),
    "mistral": ("Mistral", "sliding-window attention"),
    "qwen2": ("Qwen2 / Qwen2.5", "optional sliding window on some layers"),
    "qwen3": ("Qwen3", "q/k norms"),
    "gemma": ("Gemma", "scaled embeddings, GeGLU"),
    "gemma2": ("Gemma 2", "local/global layers, attention and final-logit soft-capping"),
    "gemma3_text": ("Gemma 3 (text)", "local/global layers, q/k norms, final-logit soft-capping"),
    "phi3": ("Phi-3", "fused qkv and gate/up projections, sliding window"),
    "olmo2": ("OLMo 2", "q/k norms, post-norm blocks"),
    "cohere": ("Cohere (Command R)", "parallel blocks, logit scale"),
    "granite": ("Granite", "embedding/attention/residual multipliers, logit scaling"),
}


def supported_text() -> str:
    """One line naming the supported families, for error messages."""
    return "supported families (transformers model_type): " + ", ".join(sorted(SUPPORTED))


def check_family(model) -> str:
    """The model's ``model_type``; ``TypeError`` naming it and the supported ones when it is not supported."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED:
        raise TypeError(f"{type(model).__name__} (model_type {family!r}) is not a supported model family; "
                        f"{supported_text()}")
    return family


def markdown_table() -> str:
    """The README's table of supported families."""
    rows = ["| family | `model_type` | what the adapter handles |", "|---|---|---|"]
    rows += [f"| {name} | `{family}` | {notes} |" for family, (name, notes) in SUPPORTED.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
