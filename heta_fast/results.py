"""The data of an explanation: what HETA computed, saved and restored; ``heta_fast.render`` shows it.

``Attribution``: the scores of one target token's context. ``MultiAttribution``: several targets
of one text, a targets x context matrix. ``Aggregation``: an attribution summed (or reduced
otherwise) over words or sentences, keeping the token-level data.

Source and special tokens: when the input was text, a result keeps the ``text`` and each context
token's character ``offsets`` into it (from the tokenizer's offset mapping); ``special`` marks
the tokenizer's special tokens (chat-template markers, BOS/EOS). Views and aggregates leave
special tokens out by default and report their share of the total score.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from heta_fast import render, spans
from heta_fast.checks import is_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REDUCERS = ("sum", "mean", "max")


class _Page:
    """The HTML views every result has (``render.html`` picks the layout: tokens, or a heat map)."""

    def to_html(self, include_special: bool = False) -> str:
        """A self-contained HTML page: tokens coloured by score with M/S/I on hover and the target
        marked, or for several targets their targets x context heat map with both axes labelled."""
        return render.html(self, include_special=include_special)

    def save_html(self, path: str | os.PathLike, include_special: bool = False) -> None:
        """Write ``to_html()`` to ``path`` (UTF-8)."""
        render.save_html(self.to_html(include_special), path)

    def _repr_html_(self) -> str:
        return render.html(self, fragment=True)


class _Table:
    """Printed as a table of its rows, best first (``render.table``); the repr shows the first ten."""

    def __str__(self) -> str:
        return render.table(self)

    def __repr__(self) -> str:
        shown = min(len(self), 10)
        more = f"\n... {len(self) - shown} more" if len(self) > shown else ""
        return f"{type(self).__name__}(\n{render.table(self, shown)}{more}\n)"


@dataclass(repr=False)
class _Scores:
    """The fields every result starts with: ``scores, M, S, I`` and the context they score."""

    scores: torch.Tensor
    M: torch.Tensor
    S: torch.Tensor
    I: torch.Tensor  # noqa: E741 - the name in docs/method.md
    context_tokens: list[str]
    context_ids: list[int]


@dataclass(repr=False)
class Attribution(_Scores, _Page, _Table):
    """HETA scores for the context of one target token.

    scores, M, S, I: ``[n]`` float tensors, one entry per context token ``x_0 .. x_{n-1}``
    (``scores = M * (beta * S + gamma * I)``). ``context_tokens``/``context_ids``: the tokens
    explained; ``target_token``/``target_id``: the token explained, at ``target_pos`` (= n).
    ``config``: the ``HETAConfig`` fields used (seed included); ``backend``: which one ran;
    ``timings``: seconds per component. ``text``/``offsets``: the input text and each context
    token's ``(start, end)`` characters in it (None for token-id input); ``special``: ``[n]``
    True where a context token is one of the tokenizer's special tokens (None: not known).
    """

    target_token: str
    target_id: int
    target_pos: int
    config: dict
    backend: str
    timings: dict = field(default_factory=dict)
    sink_share: float | None = None  # config.sink: the sink token's share of the score, before it was dropped
    text: str | None = None
    offsets: list[tuple[int, int]] | None = None
    special: list[bool] | None = None

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def special_positions(self) -> list[int]:
        """Context positions of special tokens (empty when not known)."""
        return [i for i, flag in enumerate(self.special or []) if flag]

    @property
    def special_share(self) -> float:
        """The special tokens' share of the total score, in ``[0, 1]`` (0 when the total is 0)."""
        return _share(self.scores, self.special_positions)

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
            **_source_to_dict(self),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Attribution:
        tensors = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("scores", "M", "S", "I")}
        return cls(context_tokens=list(data["context_tokens"]), context_ids=list(data["context_ids"]),
                   target_token=data["target_token"], target_id=int(data["target_id"]),
                   target_pos=int(data["target_pos"]), config=dict(data["config"]), backend=data["backend"],
                   timings=dict(data.get("timings", {})), sink_share=data.get("sink_share"), **_source_from_dict(data),
                   **tensors)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def aggregate(self, unit: str = "words", reducer: str = "sum", include_special: bool = False) -> Aggregation:
        """Scores and components over the ``words`` or ``sentences`` of the source text.

        reducer: ``sum`` (the default: unit totals add up to the token-level total), ``mean`` or
        ``max``, applied to scores, M, S and I alike. Special tokens belong to no unit unless
        ``include_special`` (their share is ``Aggregation.special_share``). Needs the text and the
        tokenizer's offsets, which results of text input carry; token-id input raises ValueError.
        """
        if unit not in spans.UNITS:
            raise ValueError(f"unknown unit {unit!r}; expected one of {', '.join(spans.UNITS)}")
        if reducer not in REDUCERS:
            raise ValueError(f"unknown reducer {reducer!r}; expected one of {', '.join(REDUCERS)}")
        if self.text is None or self.offsets is None:
            raise ValueError("aggregating needs the source text and the tokenizer's character offsets; this "
                             "result has none (it was made from token ids, or by a tokenizer without offsets): "
                             "attribute the text itself with a fast tokenizer")
        if len(self.offsets) != len(self):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self)} context tokens")
        skipped = set() if include_special else set(self.special_positions)
        unit_spans, members = spans.group_tokens(self.text, [tuple(o) for o in self.offsets], unit, skipped)
        reduced = {name: torch.stack([_reduce(getattr(self, name)[idx], reducer) for idx in members])
                   if members else torch.zeros(0) for name in ("scores", "M", "S", "I")}
        return Aggregation(unit=unit, reducer=reducer, texts=[self.text[a:b] for a, b in unit_spans],
                           spans=unit_spans, members=members, excluded=sorted(skipped),
                           special_share=_share(self.scores, sorted(skipped)), attribution=self, **reduced)

    def plot(self, k: int = 12, include_special: bool = False) -> Figure:
        """A matplotlib ``Figure``: the ``k`` best tokens, each score split into ``M*beta*S`` and ``M*gamma*I``."""
        return render.figure(self, k=k, include_special=include_special)



@dataclass
class MultiAttribution(_Scores, _Page):
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
    prompt tokens (every target was generated); None otherwise. ``text``/``offsets``/``special``:
    as for ``Attribution``, over the ``n_max`` context tokens. ``sink_shares``: per target, its
    ``Attribution.sink_share`` (empty when no sink token was added).
    """

    targets: list[int]
    target_ids: list[int]
    target_tokens: list[str]
    config: dict
    backend: str
    timings: dict = field(default_factory=dict)
    row_timings: list[dict] = field(default_factory=list)
    prompt_length: int | None = None
    text: str | None = None
    offsets: list[tuple[int, int]] | None = None
    special: list[bool] | None = None
    sink_shares: list[float | None] = field(default_factory=list)

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
                   prompt_length=prompt_length, text=longest.text, offsets=longest.offsets,
                   special=longest.special, **tensors,
                   sink_shares=[r.sink_share for r in rows] if any(r.sink_share is not None for r in rows) else [])

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
        if not is_int(k):
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
                           backend=self.backend, timings=dict(timings), text=self.text,
                           offsets=None if self.offsets is None else list(self.offsets[:n]),
                           special=None if self.special is None else list(self.special[:n]),
                           sink_share=self.sink_shares[k] if self.sink_shares else None)

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
            "sink_shares": list(self.sink_shares),
            **_source_to_dict(self),
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
                   prompt_length=None if prompt_length is None else int(prompt_length), **_source_from_dict(data),
                   sink_shares=list(data.get("sink_shares") or []), **tensors)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def special_positions(self) -> list[int]:
        """Context positions of special tokens (empty when not known)."""
        return [i for i, flag in enumerate(self.special or []) if flag]

    def aggregate(self, unit: str = "words", reducer: str = "sum", include_special: bool = False) -> list[Aggregation]:
        """``Attribution.aggregate`` of every target, in the order of ``targets``."""
        return [row.aggregate(unit, reducer, include_special) for row in self]

    def plot(self, include_special: bool = False) -> Figure:
        """A matplotlib ``Figure``: the targets x context heat map (each row over its largest score)."""
        return render.figure(self, include_special=include_special)

    def __str__(self) -> str:
        return render.heat_map(self)

    def __repr__(self) -> str:
        return f"MultiAttribution(\n{render.heat_map(self, max_rows=40)}\n)"


@dataclass(repr=False)
class Aggregation(_Table):
    """An ``Attribution`` over words or sentences (``Attribution.aggregate``).

    unit: ``words`` or ``sentences``; reducer: ``sum``, ``mean`` or ``max``. texts/spans: per unit,
    its text and ``(start, end)`` characters in the source text; members: the context positions
    of the tokens in it. scores, M, S, I: ``[u]`` float tensors, the reducer applied to the
    members' values. excluded: positions left out (special tokens); special_share: their share
    of the token-level total score. attribution: the token-level result it came from.
    """

    unit: str
    reducer: str
    texts: list[str]
    spans: list[tuple[int, int]]
    members: list[list[int]]
    scores: torch.Tensor
    M: torch.Tensor
    S: torch.Tensor
    I: torch.Tensor  # noqa: E741 - the name in docs/method.md
    excluded: list[int]
    special_share: float
    attribution: Attribution

    def __len__(self) -> int:
        return len(self.texts)

    def topk(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` highest-scoring units as ``(unit index, text, score)``, best first (ties: earlier first)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        order = sorted(range(len(self)), key=lambda u: (-float(self.scores[u]), u))[:k]
        return [(u, self.texts[u], float(self.scores[u])) for u in order]

    def to_html(self) -> str:
        """A self-contained HTML page: the units coloured by score, M/S/I and their tokens on hover."""
        return render.html(self)

    def save_html(self, path: str | os.PathLike) -> None:
        render.save_html(render.html(self), path)

    def _repr_html_(self) -> str:
        return render.html(self, fragment=True)

    def plot(self, k: int = 12) -> Figure:
        """A matplotlib ``Figure`` of the ``k`` best units (as ``Attribution.plot``)."""
        return render.figure(self, k=k)



def _reduce(values: torch.Tensor, reducer: str) -> torch.Tensor:
    if reducer == "sum":
        return values.sum()
    if reducer == "mean":
        return values.mean()
    return values.max()


def _share(scores: torch.Tensor, positions: list[int]) -> float:
    """``sum(scores[positions]) / sum(scores)``; 0 when the total is 0."""
    total = float(scores.double().sum())
    return float(scores.double()[positions].sum()) / total if positions and total else 0.0


def _source_to_dict(result) -> dict:
    return {"text": result.text,
            "offsets": None if result.offsets is None else [list(o) for o in result.offsets],
            "special": None if result.special is None else list(result.special)}


def _source_from_dict(data: dict) -> dict:
    offsets = data.get("offsets")
    special = data.get("special")
    return {"text": data.get("text"),
            "offsets": None if offsets is None else [(int(a), int(b)) for a, b in offsets],
            "special": None if special is None else [bool(f) for f in special]}


def from_json(text: str) -> Attribution | MultiAttribution:
    """A result saved with ``to_json()``: an ``Attribution``, or a ``MultiAttribution`` when it has ``targets``.

    Raises ValueError when the text is not JSON or not a saved result.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a saved heta_fast result: a JSON {type(data).__name__}, not an object")
    cls = MultiAttribution if "targets" in data else Attribution
    try:
        return cls.from_dict(data)
    except KeyError as exc:
        raise ValueError(f"not a saved heta_fast result: no {exc.args[0]!r} field") from None
