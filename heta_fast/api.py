"""``HETA``: the one entry point, from text to ``Attribution``.

    heta = HETA.from_pretrained()                 # embedded SmolLM2-135M-Instruct
    attribution = heta.attribute("The capital of France is Paris")
    print(attribution)
    several = heta.attribute("The capital of France is Paris", targets=[3, 5])  # MultiAttribution
    generation = heta.explain_generation("The capital of France is", max_new_tokens=8)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from heta_fast import backends, pipeline, sink
from heta_fast.checks import is_int
from heta_fast.components import Components, Progress, windowed
from heta_fast.config import HETAConfig
from heta_fast.embedded import default_model_path
from heta_fast.memory import check_fits, default_budget
from heta_fast.mix import mixed
from heta_fast.model import CausalLM
from heta_fast.results import Attribution, MultiAttribution


class HETA:
    """Explains a causal LM's token predictions with HETA.

    model: a transformers ``AutoModelForCausalLM`` of a supported family (``heta_fast.families``);
    it is left as it was: each call runs it in eval mode, with frozen weights, eager attention and
    (bf16/fp16 models) float32 weights, and restores it on return (``CausalLM.prepared``).
    tokenizer: its tokenizer (needed for text input and token strings); config: the default
    ``HETAConfig`` for ``attribute``.
    """

    def __init__(self, model, tokenizer=None, config: HETAConfig | None = None):
        if config is not None and not isinstance(config, HETAConfig):
            raise TypeError(f"config must be a HETAConfig, got {type(config).__name__}")
        self.lm = CausalLM(model)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or HETAConfig()

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, config: HETAConfig | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> HETA:
        """Load a model and tokenizer with transformers; ``None`` loads the embedded SmolLM2-135M-Instruct."""
        if name_or_path is None:
            name_or_path = default_model_path()
        from transformers.models.auto import AutoModelForCausalLM, AutoTokenizer  # seconds to import: on use

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="eager")
        if device is not None:
            model = model.to(device)
        model.eval().requires_grad_(False)  # this model is HETA's own: frozen for good, not per call
        return cls(model, tokenizer, config)

    def tokenize(self, text_or_ids: str | Sequence[int] | torch.Tensor) -> list[int]:
        """Text (tokenised with the model's tokenizer) or token ids -> a list of ids."""
        if isinstance(text_or_ids, str):
            if not text_or_ids.strip():
                raise ValueError("empty text: nothing to attribute")
            if self.tokenizer is None:
                raise ValueError("text input needs a tokenizer: pass one to HETA(model, tokenizer) or give token ids")
            return list(self.tokenizer(text_or_ids)["input_ids"])
        if isinstance(text_or_ids, torch.Tensor):
            if text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
                text_or_ids = text_or_ids[0]
            if text_or_ids.dim() != 1 or text_or_ids.dtype.is_floating_point or text_or_ids.is_complex():
                raise TypeError(f"token ids must be a 1-D integer tensor, got shape {tuple(text_or_ids.shape)} "
                                f"and dtype {text_or_ids.dtype}")
            ids = text_or_ids.tolist()
        else:
            try:
                ids = list(text_or_ids)
            except TypeError:
                raise TypeError(f"expected text or token ids, got {type(text_or_ids).__name__}") from None
        if any(not is_int(i) for i in ids):
            raise TypeError("token ids must be ints")
        if not ids:
            raise ValueError("empty input: no token ids")
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.lm.vocab_size})")
        return ids

    def target_id(self, target_token: str | int) -> int:
        """A target given as a token string (exactly one token) or an id -> the id."""
        if isinstance(target_token, str):
            if self.tokenizer is None:
                raise ValueError("a target token string needs a tokenizer; give the token id instead")
            ids = self.tokenizer(target_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"target token {target_token!r} is {len(ids)} tokens for this tokenizer; "
                                 "give exactly one token (or its id)")
            return ids[0]
        if not is_int(target_token):
            raise TypeError(f"target_token must be a str or an int id, got {type(target_token).__name__}")
        if not 0 <= target_token < self.lm.vocab_size:
            raise ValueError(f"target token id {target_token} is outside the vocabulary [0, {self.lm.vocab_size})")
        return target_token

    def sink_token(self, config: HETAConfig) -> int | None:
        """The id ``config.sink`` puts before the text (None for ``sink="none"``); ``ValueError``
        when ``sink="bos"`` finds no usable token (``heta_fast.sink.sink_token_id``)."""
        if config.sink == "none":
            return None
        return sink.sink_token_id(self.tokenizer, self.model, self.lm.vocab_size)

    def attribute(self, text_or_ids: str | Sequence[int] | torch.Tensor, target_pos: int | None = None,
                  target_token: str | int | None = None, *, targets: Sequence[int] | None = None,
                  config: HETAConfig | None = None, progress: Progress | None = None,
                  **overrides) -> Attribution | MultiAttribution:
        """Explain the token at ``target_pos`` (default: the last one) by the tokens before it.

        text_or_ids: text or ``L`` token ids. target_pos: ``t`` in ``[1, L - 1]``; tokens after it
        are ignored. With ``target_token`` the token explained is that one instead of ``x_t``
        (to explain a token the model did not pick); ``target_pos = L`` is then allowed and
        appends it after the whole input. config/overrides: this call's ``HETAConfig`` (fields
        given as keywords replace the default's). progress: ``progress(stage, done, total)``.
        targets: several positions at once instead of ``target_pos``; returns a
        ``MultiAttribution`` (see ``attribute_targets``).
        """
        if targets is not None:
            if target_pos is not None or target_token is not None:
                raise ValueError("give either targets or target_pos/target_token, not both")
            return self.attribute_targets(text_or_ids, targets, config=config, progress=progress, **overrides)
        config = self._config(config, overrides)
        token = self.sink_token(config)
        ids = self.tokenize(text_or_ids)
        L = len(ids)
        last = L if target_token is not None else L - 1
        if target_pos is None:
            target_pos = L - 1
        if not is_int(target_pos):
            raise TypeError(f"target_pos must be an int, got {type(target_pos).__name__}")
        if L < 2 and target_token is None:
            raise ValueError(f"need at least 2 tokens (a context and a target), got {L}")
        if not 1 <= target_pos <= last:
            raise ValueError(f"target_pos {target_pos} is out of range: it must lie in [1, {last}] "
                             f"for {L} tokens (position 0 has no context)")
        y = self.target_id(target_token) if target_token is not None else ids[target_pos]
        backend = backends.resolve(config.backend, self.lm)
        windows = bool(config.window_size) and target_pos > config.window_size
        self.check_size(target_pos + 1, config, sink_rows=int(config.sink != "none" and (windows or ids[0] != token)))
        context = torch.tensor(ids[:target_pos], dtype=torch.long)
        shares: list[float] = []

        def compute(window: torch.Tensor) -> Components:  # ids [w + 1]: a window of the context, the target
            window_ids, _, added = sink.prepend(window.tolist(), 0, config.sink, token)  # a sink per window
            c = backend.components(self.lm, torch.tensor(window_ids, dtype=torch.long), config, progress)
            c, share = sink.strip(c, added, config.beta, config.gamma, config.mix)
            if share is not None:
                shares.append(share)
            return c

        with self.lm.prepared():
            c = windowed(compute, context, y, config.window_size, config.overlap)
        share = sum(shares) / len(shares) if shares else None
        return self._with_source(self._attribution(c, context.tolist(), y, target_pos, config, backend.name, share),
                                 text_or_ids)

    def attribute_targets(self, text_or_ids: str | Sequence[int] | torch.Tensor, targets: Sequence[int], *,
                          config: HETAConfig | None = None, progress: Progress | None = None,
                          prompt_length: int | None = None, **overrides) -> MultiAttribution:
        """Explain several tokens of one text: row ``k`` explains the token at ``targets[k]``.

        text_or_ids: text or ``L`` token ids; targets: distinct positions in ``[1, L - 1]``, in
        any order (rows keep it). Each row equals ``attribute(text_or_ids, target_pos=targets[k])``.
        On the torch and triton backends one forward, one semantic-flow descent and (masks
        ``zero``/``unk``) one set of masked forwards serve all targets; ``S`` runs per target.
        With ``sink="bos"`` one sink token before the text serves every target. The reference
        backend, and windows (``window_size`` set and a target's context longer
        than it), explain the targets one by one with ``attribute``.
        """
        config = self._config(config, overrides)
        token = self.sink_token(config)
        ids = self.tokenize(text_or_ids)
        targets = pipeline.check_targets(targets, len(ids))
        backend = backends.resolve(config.backend, self.lm)
        # one sink token before the text serves every target: positions shift by ``added``
        ids, _, added = sink.prepend(ids, 0, config.sink, token)
        shifted = [t + added for t in targets]
        windows = bool(config.window_size) and max(targets) > config.window_size  # windows are cut per target
        self.check_size(max(targets) + 1, config, sink_rows=int(config.sink != "none" and (windows or added)))
        if windows:
            with self.lm.prepared():
                rows = [self.attribute(ids[added:], target_pos=t, config=config, progress=progress)
                        for t in targets]
            return self._with_source(MultiAttribution.from_rows(rows, config=config.to_dict(), backend=backend.name,
                                                                prompt_length=prompt_length), text_or_ids)
        parts, timings = backend.run_many(self.lm, torch.tensor(ids, dtype=torch.long), shifted, config, progress)
        rows = []
        for c, t in zip(parts, shifted, strict=True):
            c, share = sink.strip(c, added, config.beta, config.gamma, config.mix)
            rows.append(self._attribution(c, ids[added:t], ids[t], t - added, config, backend.name, share))
        return self._with_source(MultiAttribution.from_rows(rows, config=config.to_dict(), backend=backend.name,
                                                            timings=timings, prompt_length=prompt_length), text_or_ids)

    def generate(self, text_or_ids: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 16,
                 stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding: the prompt's ids followed by up to ``max_new_tokens`` argmax tokens.

        Stops after an end-of-sequence token when ``stop_at_eos`` (the EOS is kept: it was
        generated). Uses the model's key/value cache, one new row per step.
        """
        if not is_int(max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.tokenize(text_or_ids)
        limit = self.lm.position_limit
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's limit "
                             f"of {limit} positions (max_position_embeddings); shorten the prompt or generate fewer")
        eos = self._eos_ids() if stop_at_eos else set()
        out = list(ids)
        with torch.no_grad(), self.lm.prepared():
            step = self.lm.hidden(self.lm.embed(torch.tensor(ids, dtype=torch.long))[None], use_cache=True)
            for _ in range(max_new_tokens):
                token = int(self.lm.unembed(step.last_hidden_state[0, -1]).argmax())
                out.append(token)
                if token in eos or len(out) - len(ids) == max_new_tokens:
                    break
                cache = getattr(step, "cache", None) or step.past_key_values
                step = self.lm.hidden(self.lm.embed(torch.tensor([token]))[None], past=cache)
        return out

    def explain_generation(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 16, *,
                           stop_at_eos: bool = True, config: HETAConfig | None = None,
                           progress: Progress | None = None, **overrides) -> MultiAttribution:
        """Generate greedily after ``prompt``, then explain every generated token by what precedes it.

        Returns a ``MultiAttribution`` whose targets are the generated positions
        (``prompt_length .. prompt_length + new - 1``); row ``k`` explains generated token ``k``
        by the prompt and the tokens generated before it.
        """
        config = self._config(config, overrides)
        backends.check(config.backend, self.lm.device)
        ids = self.generate(prompt, max_new_tokens, stop_at_eos)
        start = len(self.tokenize(prompt))
        return self.attribute_targets(ids, list(range(start, len(ids))), config=config, progress=progress,
                                      prompt_length=start)

    def check_size(self, rows: int, config: HETAConfig, sink_rows: int = 0) -> None:
        """``ValueError`` before any model work when ``rows`` positions (context and target) cannot run.

        With windows (``window_size`` set and shorter than the context) each forward runs
        ``window_size + 1`` rows instead; ``sink_rows`` (0 or 1): the sink token put before the
        context (or before each window). Checks the model's position limit, then that the shared
        forward fits ``memory_budget`` (``heta_fast.memory.check_fits``).
        """
        window = config.window_size
        windows = bool(window) and rows - 1 > window
        run = (window + 1 if windows else rows) + sink_rows
        limit = self.lm.position_limit
        if limit is not None and run > limit:
            what = f"a window of {window} tokens" if windows else f"{rows - 1} context tokens"
            what += ", the sink token and the target make" if sink_rows else " and the target make"
            raise ValueError(f"{what} {run} positions, more than this {self.lm.family} model's limit of {limit} "
                             f"(max_position_embeddings); pass window_size <= {limit - 1 - sink_rows} to attribute "
                             f"it in windows")
        check_fits(self.lm, run, config.memory_budget or default_budget(self.lm.device))

    def _config(self, config: HETAConfig | None, overrides: dict) -> HETAConfig:
        """This call's configuration: ``config`` (or the default) with ``overrides`` replacing fields."""
        if config is not None and not isinstance(config, HETAConfig):
            raise TypeError(f"config must be a HETAConfig, got {type(config).__name__}")
        config = config or self.config
        return config.replace(**overrides) if overrides else config

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    def _attribution(self, c: Components, context: list[int], y: int, target_pos: int, config: HETAConfig,
                     backend: str, sink_share: float | None = None) -> Attribution:
        """Components of one target -> its ``Attribution`` (scores combined here, ``config.mix``)."""
        M, S, I = (x.detach().float().cpu() for x in (c.M, c.S, c.I))
        return Attribution(scores=mixed(Components(M, S, I), config.beta, config.gamma, config.mix), M=M, S=S, I=I,
                           context_tokens=self._token_strings(context), context_ids=list(context),
                           target_token=self._token_strings([y])[0], target_id=y, target_pos=target_pos,
                           config=config.to_dict(), backend=backend, timings=c.timings, sink_share=sink_share)

    def _with_source(self, result: Attribution | MultiAttribution, text_or_ids) -> Attribution | MultiAttribution:
        """Mark the tokenizer's special tokens; for text input, keep the text and each token's character offsets
        (``Attribution.aggregate`` groups tokens into words and sentences by them; slow tokenizers have none)."""
        special_ids = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        result.special = [i in special_ids for i in result.context_ids]
        if isinstance(text_or_ids, str) and getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text_or_ids, return_offsets_mapping=True)["offset_mapping"]
            result.text, result.offsets = text_or_ids, [(int(a), int(b)) for a, b in offsets[:len(result.context_ids)]]
        return result

    def _token_strings(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]
