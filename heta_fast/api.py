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

from heta_fast import backends, multi_target, sink
from heta_fast.attribution import Attribution, MultiAttribution
from heta_fast.components import Components, Progress, windowed
from heta_fast.config import HETAConfig
from heta_fast.mix import mixed
from heta_fast.model import CausalLM


class HETA:
    """Explains a causal LM's token predictions with HETA.

    model: a transformers ``AutoModelForCausalLM`` (switched to eval mode, frozen weights and
    eager attention); tokenizer: its tokenizer (needed for text input and token strings);
    config: the default ``HETAConfig`` for ``attribute``.
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
            from heta_fast.embedded import default_model_path

            name_or_path = default_model_path()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="eager")
        if device is not None:
            model = model.to(device)
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
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
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
        if isinstance(target_token, bool) or not isinstance(target_token, int):
            raise TypeError(f"target_token must be a str or an int id, got {type(target_token).__name__}")
        if not 0 <= target_token < self.lm.vocab_size:
            raise ValueError(f"target token id {target_token} is outside the vocabulary [0, {self.lm.vocab_size})")
        return target_token

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
        config = config or self.config
        if overrides:
            config = config.replace(**overrides)
        ids = self.tokenize(text_or_ids)
        L = len(ids)
        last = L if target_token is not None else L - 1
        if target_pos is None:
            target_pos = L - 1
        if isinstance(target_pos, bool) or not isinstance(target_pos, int):
            raise TypeError(f"target_pos must be an int, got {type(target_pos).__name__}")
        if L < 2 and target_token is None:
            raise ValueError(f"need at least 2 tokens (a context and a target), got {L}")
        if not 1 <= target_pos <= last:
            raise ValueError(f"target_pos {target_pos} is out of range: it must lie in [1, {last}] "
                             f"for {L} tokens (position 0 has no context)")
        y = self.target_id(target_token) if target_token is not None else ids[target_pos]
        token = sink.sink_token_id(self.tokenizer, self.model)
        ids, target_pos, added = sink.prepend(ids, target_pos, config.sink, token)
        backend = backends.resolve(config.backend, self.lm)
        context = torch.tensor(ids[:target_pos], dtype=torch.long)
        c = windowed(lambda window: backend.components(self.lm, window, config, progress), context, y,
                     config.window_size, config.overlap)
        c, share = sink.strip(c, added, config.beta, config.gamma, config.mix)
        return self._attribution(c, context.tolist()[added:], y, target_pos - added, config, backend.name, share)

    def attribute_targets(self, text_or_ids: str | Sequence[int] | torch.Tensor, targets: Sequence[int], *,
                          config: HETAConfig | None = None, progress: Progress | None = None,
                          prompt_length: int | None = None, **overrides) -> MultiAttribution:
        """Explain several tokens of one text: row ``k`` explains the token at ``targets[k]``.

        text_or_ids: text or ``L`` token ids; targets: distinct positions in ``[1, L - 1]``, in
        any order (rows keep it). Each row equals ``attribute(text_or_ids, target_pos=targets[k])``.
        On the torch and triton backends one forward, one semantic-flow descent and (masks
        ``zero``/``unk``) one set of masked forwards serve all targets; ``S`` runs per target.
        The reference backend, and windows (``window_size`` set and a target's context longer
        than it), explain the targets one by one with ``attribute``.
        """
        config = config or self.config
        if overrides:
            config = config.replace(**overrides)
        ids = self.tokenize(text_or_ids)
        targets = multi_target.check_targets(targets, len(ids))
        backend = backends.resolve(config.backend, self.lm)
        windows = bool(config.window_size) and max(targets) > config.window_size
        if backend.name == "reference" or windows or config.sink != "none":
            rows = [self.attribute(ids, target_pos=t, config=config, progress=progress) for t in targets]
            return MultiAttribution.from_rows(rows, config=config.to_dict(), backend=backend.name,
                                              prompt_length=prompt_length)
        parts, timings = multi_target.components_many(self.lm, torch.tensor(ids, dtype=torch.long), targets, config,
                                                      progress, ops=multi_target.ops_for(backend.name))
        rows = [self._attribution(c, ids[:t], ids[t], t, config, backend.name)
                for c, t in zip(parts, targets, strict=True)]
        return MultiAttribution.from_rows(rows, config=config.to_dict(), backend=backend.name, timings=timings,
                                          prompt_length=prompt_length)

    def generate(self, text_or_ids: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 16,
                 stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding: the prompt's ids followed by up to ``max_new_tokens`` argmax tokens.

        Stops after an end-of-sequence token when ``stop_at_eos`` (the EOS is kept: it was
        generated). Uses the model's key/value cache, one new row per step.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.tokenize(text_or_ids)
        eos = self._eos_ids() if stop_at_eos else set()
        out = list(ids)
        with torch.no_grad():
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
        config = config or self.config
        if overrides:
            config = config.replace(**overrides)
        backends.check(config.backend, self.lm.device)
        ids = self.generate(prompt, max_new_tokens, stop_at_eos)
        start = len(self.tokenize(prompt))
        return self.attribute_targets(ids, list(range(start, len(ids))), config=config, progress=progress,
                                      prompt_length=start)

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

    def _token_strings(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]
