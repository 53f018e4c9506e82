"""``Attribution``: the result of explaining one target token, and how it shows itself."""

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
        }

    @classmethod
    def from_dict(cls, data: dict) -> Attribution:
        tensors = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("scores", "M", "S", "I")}
        return cls(context_tokens=list(data["context_tokens"]), context_ids=list(data["context_ids"]),
                   target_token=data["target_token"], target_id=int(data["target_id"]),
                   target_pos=int(data["target_pos"]), config=dict(data["config"]), backend=data["backend"],
                   timings=dict(data.get("timings", {})), **tensors)

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


def _heat_colour(x: float) -> int:
    """xterm-256 colour from white (0) to deep red (1)."""
    ramp = [231, 224, 217, 210, 203, 196, 160]
    return ramp[min(len(ramp) - 1, max(0, int(x * (len(ramp) - 1) + 0.5)))]
