"""``Attribution``: the result of explaining one target token, and how it shows itself.

``MultiAttribution``: several targets of one text, a targets x context matrix of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

_BLOCKS = " ▁▂▃▄▅▆▇█"


@dataclass
class Attribution:
    """HETA scores for the context of one target token.

    scores, M, S, I: ``[n]`` float tensors, one entry per context token ``x_0 .. x_{n-1}``
    (``scores = M * (beta * S + gamma * I)``). ``context_tokens``/``context_ids``: the tokens
    explained; ``target_token``/``target_id``: the token explained, at ``target_pos`` (= n).
    ``config``: the ``HETAConfig`` fields used (seed included); ``backend``: which one ran;
    ``timings``: seconds per component.
    """

    scores: torch.Tensor
    M: torch.Tensor
    S: torch.Tensor
    I: torch.Tensor  # noqa: E741 - the spec's name
    context_tokens: list[str]
    context_ids: list[int]
    target_token: str
    target_id: int
    target_pos: int
    config: dict
    backend: str
    timings: dict = field(default_factory=dict)
    sink_share: float | None = None  # config.sink: the sink token's share of the score, before it was dropped

    @property
    def seed(self) -> int:
        return self.config["seed"]

    def __len__(self) -> int:
        return len(self.context_ids)

    def topk(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` highest-scoring context tokens as ``(position, token, score)``, best first.

        Ties keep the earlier position first.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        order = sorted(range(len(self)), key=lambda i: (-float(self.scores[i]), i))[:k]
        return [(i, self.context_tokens[i], float(self.scores[i])) for i in order]

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``Attribution.from_dict`` inverts it."""
        return {
            "target_pos": self.target_pos,
            "target_id": self.target_id,
            "target_token": self.target_token,
            "context_ids": list(self.context_ids),
            "context_tokens": list(self.context_tokens),
            "scores": self.scores.tolist(),
            "M": self.M.tolist(),
            "S": self.S.tolist(),
            "I": self.I.tolist(),
            "config": dict(self.config),
            "backend": self.backend,
            "timings": dict(self.timings),
            "sink_share": self.sink_share,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Attribution:
        tensors = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("scores", "M", "S", "I")}
        return cls(context_tokens=list(data["context_tokens"]), context_ids=list(data["context_ids"]),
                   target_token=data["target_token"], target_id=int(data["target_id"]),
                   target_pos=int(data["target_pos"]), config=dict(data["config"]), backend=data["backend"],
                   timings=dict(data.get("timings", {})), sink_share=data.get("sink_share"), **tensors)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, k: int | None = None, color: bool = False) -> str:
        """A text table of the context tokens, highest score first (all of them when ``k`` is None)."""
        rows = self.topk(k or len(self))
        top = max((s for _, _, s in rows), default=0.0) or 1.0
        width = max([5] + [len(repr(tok)) for _, tok, _ in rows])
        lines = [f"target {self.target_token!r} (id {self.target_id}) at position {self.target_pos}, "
                 f"{len(self)} context tokens, backend {self.backend}",
                 f"{'pos':>5}  {'token':<{width}}  {'score':>11}  {'M':>9}  {'S':>11}  {'I':>11}  heat"]
        for i, tok, s in rows:
            level = min(len(_BLOCKS) - 1, max(0, round(s / top * (len(_BLOCKS) - 1))))
            heat = _BLOCKS[level] * 4
            if color:
                heat = f"\x1b[38;5;{_heat_colour(s / top)}m{heat}\x1b[0m"
            lines.append(f"{i:>5}  {tok!r:<{width}}  {s:>11.4e}  {float(self.M[i]):>9.4f}  "
                         f"{float(self.S[i]):>11.4e}  {float(self.I[i]):>11.4e}  {heat}")
        return "\n".join(lines)

    def heat_strip(self, color: bool = True) -> str:
        """The context in reading order, each token tinted by its score."""
        top = float(self.scores.max()) if len(self) else 0.0
        top = top if top > 0 else 1.0
        parts = []
        for tok, s in zip(self.context_tokens, self.scores.tolist(), strict=True):
            if color:
                parts.append(f"\x1b[48;5;{_heat_colour(s / top)}m\x1b[30m{tok}\x1b[0m")
            else:
                parts.append(f"[{tok}|{s / top:.2f}]")
        return "".join(parts)

    def __repr__(self) -> str:
        shown = min(len(self), 10)
        more = f"\n... {len(self) - shown} more" if len(self) > shown else ""
        return f"Attribution(\n{self.table(shown)}{more}\n)"


@dataclass
class MultiAttribution:
    """HETA scores for several target tokens of one text: a targets x context matrix.

    Row ``k`` explains the target at position ``targets[k]`` by its own context
    ``x_0 .. x_{targets[k] - 1}``; it equals the single-target ``Attribution`` of that target
    (``self[k]`` returns it).

    scores, M, S, I: ``[K, n_max]`` float32, ``K = len(targets)``, ``n_max = max(targets)``.
    Entries at positions ``>= targets[k]`` lie outside target ``k``'s context and are NaN, not 0:
    0 is a real score, and NaN keeps a missing entry from passing for one (``valid`` marks the
    defined entries; ``matrix.nan_to_num()`` gives zeros). ``context_ids``/``context_tokens``:
    ``x_0 .. x_{n_max - 1}``, shared by all rows (each row reads a prefix). ``targets``: the
    positions in the order asked; ``target_ids``/``target_tokens``: the tokens there.
    ``config``/``backend``: as for ``Attribution``. ``timings``: seconds per stage of the whole
    call. ``row_timings``: per target, the seconds spent on that target alone (everything when
    targets were explained one by one; on the shared path only its own ``S``, and ``I`` when the
    mask is ``mean``). ``prompt_length``: set by ``HETA.explain_generation``, the number of
    prompt tokens (every target was generated); None otherwise.
    """

    scores: torch.Tensor
    M: torch.Tensor
    S: torch.Tensor
    I: torch.Tensor  # noqa: E741 - the spec's name
    context_tokens: list[str]
    context_ids: list[int]
    targets: list[int]
    target_ids: list[int]
    target_tokens: list[str]
    config: dict
    backend: str
    timings: dict = field(default_factory=dict)
    row_timings: list[dict] = field(default_factory=list)
    prompt_length: int | None = None

    @classmethod
    def from_rows(cls, rows: list[Attribution], *, config: dict, backend: str, timings: dict | None = None,
                  prompt_length: int | None = None) -> MultiAttribution:
        """Stack single-target attributions of one text (their contexts are prefixes of one another)."""
        if not rows:
            raise ValueError("no attributions to stack")
        longest = max(rows, key=len)
        n_max = len(longest)
        for row in rows:
            if row.context_ids != longest.context_ids[:len(row)]:
                raise ValueError(f"target {row.target_pos}'s context is not a prefix of the longest context")
        tensors = {}
        for name in ("scores", "M", "S", "I"):
            out = torch.full((len(rows), n_max), float("nan"), dtype=torch.float32)
            for k, row in enumerate(rows):
                out[k, :len(row)] = getattr(row, name).float()
            tensors[name] = out
        if timings is None:
            timings = {}
            for row in rows:
                for stage, seconds in row.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
        return cls(context_tokens=list(longest.context_tokens), context_ids=list(longest.context_ids),
                   targets=[r.target_pos for r in rows], target_ids=[r.target_id for r in rows],
                   target_tokens=[r.target_token for r in rows], config=dict(config), backend=backend,
                   timings=dict(timings), row_timings=[dict(r.timings) for r in rows],
                   prompt_length=prompt_length, **tensors)

    @property
    def matrix(self) -> torch.Tensor:
        """The scores, ``[K, n_max]`` (targets x context positions; NaN outside a target's context)."""
        return self.scores

    @property
    def valid(self) -> torch.Tensor:
        """``[K, n_max]`` bool: True where position ``i`` is in target ``k``'s context (``i < targets[k]``)."""
        positions = torch.arange(len(self.context_ids))
        return positions[None, :] < torch.tensor(self.targets)[:, None]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, k: int) -> Attribution:
        """The single-target ``Attribution`` of target ``k`` (negative ``k`` counts from the end)."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"index with an int target number, got {type(k).__name__}")
        if not -len(self) <= k < len(self):
            raise IndexError(f"target {k} out of range for {len(self)} targets")
        k %= len(self)
        n = self.targets[k]
        timings = self.row_timings[k] if self.row_timings else {}
        return Attribution(scores=self.scores[k, :n].clone(), M=self.M[k, :n].clone(), S=self.S[k, :n].clone(),
                           I=self.I[k, :n].clone(), context_tokens=self.context_tokens[:n],
                           context_ids=self.context_ids[:n], target_token=self.target_tokens[k],
                           target_id=self.target_ids[k], target_pos=n, config=dict(self.config),
                           backend=self.backend, timings=dict(timings))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def to_dict(self) -> dict:
        """A JSON-ready dict (rows stored ragged, so no NaN); ``MultiAttribution.from_dict`` inverts it."""
        rows = {name: [getattr(self, name)[k, :t].tolist() for k, t in enumerate(self.targets)]
                for name in ("scores", "M", "S", "I")}
        return {
            "targets": list(self.targets),
            "target_ids": list(self.target_ids),
            "target_tokens": list(self.target_tokens),
            "context_ids": list(self.context_ids),
            "context_tokens": list(self.context_tokens),
            **rows,
            "config": dict(self.config),
            "backend": self.backend,
            "timings": dict(self.timings),
            "row_timings": [dict(t) for t in self.row_timings],
            "prompt_length": self.prompt_length,
        }

    @classmethod
    def from_dict(cls, data: dict) -> MultiAttribution:
        targets = [int(t) for t in data["targets"]]
        n_max = len(data["context_ids"])
        tensors = {}
        for name in ("scores", "M", "S", "I"):
            out = torch.full((len(targets), n_max), float("nan"), dtype=torch.float32)
            for k, row in enumerate(data[name]):
                out[k, :len(row)] = torch.tensor(row, dtype=torch.float32)
            tensors[name] = out
        prompt_length = data.get("prompt_length")
        return cls(context_tokens=list(data["context_tokens"]), context_ids=list(data["context_ids"]),
                   targets=targets, target_ids=[int(i) for i in data["target_ids"]],
                   target_tokens=list(data["target_tokens"]), config=dict(data["config"]), backend=data["backend"],
                   timings=dict(data.get("timings", {})), row_timings=[dict(t) for t in data.get("row_timings", [])],
                   prompt_length=None if prompt_length is None else int(prompt_length), **tensors)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def heat_map(self, max_rows: int | None = None) -> str:
        """Context tokens down, targets across; each cell is the score over its target's largest score.

        ``*`` marks a target's own position; blank cells lie outside a target's context. With
        ``max_rows`` only the first and last positions are shown (a quarter from the start).
        """
        K, n = len(self), len(self.context_ids)
        lines = [f"{K} targets over {n} context tokens, backend {self.backend}; "
                 "cell = score / the target's largest score, * = the target itself"]
        legend = [f"{k:>3}: {t} {tok!r}" for k, (t, tok) in enumerate(zip(self.targets, self.target_tokens,
                                                                          strict=True))]
        column = max(len(entry) for entry in legend)
        for start in range(0, K, 4):
            lines.append("  ".join(f"{entry:<{column}}" for entry in legend[start:start + 4]).rstrip())
        top = torch.nan_to_num(self.scores, nan=0.0).amax(dim=1).clamp_min(1e-30) if n else torch.ones(K)
        width = min(16, max([5] + [len(repr(tok)) for tok in self.context_tokens]))
        lines.append(f"{'pos':>5}  {'token':<{width}}  " + " ".join(str(k % 10) for k in range(K)))
        shown = list(range(n))
        if max_rows is not None and n > max_rows:
            head = max(1, max_rows // 4)
            shown = list(range(head)) + [None] + list(range(n - (max_rows - head), n))
        for i in shown:
            if i is None:
                lines.append(f"{'...':>5}  ({n - max_rows} positions not shown)")
                continue
            cells = []
            for k, t in enumerate(self.targets):
                if i == t:
                    cells.append("*")
                elif i > t:
                    cells.append(" ")
                else:
                    level = round(float(self.scores[k, i]) / float(top[k]) * (len(_BLOCKS) - 1))
                    cells.append(_BLOCKS[min(len(_BLOCKS) - 1, max(1, level))])  # never blank inside a context
            token = repr(self.context_tokens[i])
            token = token if len(token) <= width else token[:width - 1] + "…"
            lines.append((f"{i:>5}  {token:<{width}}  " + " ".join(cells)).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MultiAttribution(\n{self.heat_map(max_rows=40)}\n)"


def _heat_colour(x: float) -> int:
    """xterm-256 colour from white (0) to deep red (1)."""
    ramp = [231, 224, 217, 210, 203, 196, 160]
    return ramp[min(len(ramp) - 1, max(0, int(x * (len(ramp) - 1) + 0.5)))]
