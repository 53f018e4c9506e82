"""How a result shows itself: terminal tables and heat strips, HTML pages, matplotlib figures.

Every view takes an ``Attribution``, an ``Aggregation`` (words or sentences) or, for the heat
maps, a ``MultiAttribution`` from ``heta_fast.results``. Colours scale each view's values by
their largest one (HETA's scores and components are all >= 0), so 1 is the strongest token.
Special tokens (``result.special``) are left out unless ``include_special``; a note gives
their share of the total score.

HTML pages are self-contained: inline CSS, no scripts, no fonts or images from anywhere. The
component shown (score, M, S or I) is a CSS-only toggle (radio buttons), and every token's
values are in its ``title`` (shown on hover). Token text is escaped; its whitespace is drawn
visibly (``·`` space, ``↵`` line break, ``⇥`` tab).

matplotlib is optional (``pip install 'heta_fast[plot]'``); only ``figure`` needs it.
"""

from __future__ import annotations

import html as _html
import itertools
import math
import os
from typing import TYPE_CHECKING

import torch

from heta_fast.checks import is_int
from heta_fast.components import Components
from heta_fast.mix import formula, terms

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from heta_fast.results import Aggregation, Attribution, MultiAttribution

COMPONENTS = ("scores", "M", "S", "I")
_LABELS = {"scores": "score", "M": "M (semantic flow)", "S": "S (Hessian)", "I": "I (KL)"}
_BLOCKS = " ▁▂▃▄▅▆▇█"
# The HTML colour ramp, white to dark red (ColorBrewer OrRd), as (position, (r, g, b)) stops.
_RAMP = ((0.0, (255, 255, 255)), (0.25, (253, 212, 158)), (0.5, (252, 141, 89)), (0.75, (215, 48, 31)),
         (1.0, (127, 0, 0)))
_VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
_page_ids = itertools.count()


# --- shared ----------------------------------------------------------------------------------


def _shown(result, include_special: bool) -> list[int]:
    """Indices of the tokens (or units) a view shows."""
    special = set() if include_special else set(getattr(result, "special_positions", []))
    return [i for i in range(len(result)) if i not in special]


def _labels(result) -> list[str]:
    return list(result.texts) if hasattr(result, "texts") else list(result.context_tokens)


def _attribution(result) -> Attribution:
    """The token-level result behind a view (an Aggregation's source, or the result itself)."""
    return getattr(result, "attribution", result)


def _special_note(result, include_special: bool) -> str | None:
    """'3 special tokens left out (12.5% of the total score)', or None when none were."""
    if hasattr(result, "excluded"):
        count, share = len(result.excluded), result.special_share
    elif include_special:
        return None
    else:
        count, share = len(result.special_positions), result.special_share
    if not count:
        return None
    return f"{count} special token{'s' if count > 1 else ''} left out ({100 * share:.1f}% of the total score)"


def _fraction(value: float, top: float) -> float:
    if not math.isfinite(value) or top <= 0:
        return 0.0
    return min(1.0, max(0.0, value / top))


# --- terminal --------------------------------------------------------------------------------


def table(result: Attribution | Aggregation, k: int | None = None, color: bool = False,
          include_special: bool = False) -> str:
    """A text table, highest score first: position (or unit), text, score, M, S, I, a heat bar.

    k: the number of rows (all when None); color: tint the heat bar with xterm-256 colours.
    """
    shown = _shown(result, include_special)
    labels = _labels(result)
    order = sorted(shown, key=lambda i: (-float(result.scores[i]), i))[:k or len(shown)]
    top = max((float(result.scores[i]) for i in order), default=0.0)
    width = max([5] + [len(repr(labels[i])) for i in order])
    source = _attribution(result)
    what = f"{result.unit} (reducer {result.reducer}) of " if hasattr(result, "unit") else ""
    count = f"{len(result)} {result.unit}" if hasattr(result, "unit") else f"{len(result)} context tokens"
    lines = [f"{what}target {source.target_token!r} (id {source.target_id}) at position {source.target_pos}, "
             f"{count}, backend {source.backend}",
             f"{'unit' if hasattr(result, 'unit') else 'pos':>5}  {'token' if not what else 'text':<{width}}  "
             f"{'score':>11}  {'M':>9}  {'S':>11}  {'I':>11}  heat"]
    for i in order:
        s = float(result.scores[i])
        heat = _BLOCKS[round(_fraction(s, top) * (len(_BLOCKS) - 1))] * 4
        if color:
            heat = f"\x1b[38;5;{_xterm(_fraction(s, top))}m{heat}\x1b[0m"
        lines.append(f"{i:>5}  {labels[i]!r:<{width}}  {s:>11.4e}  {float(result.M[i]):>9.4f}  "
                     f"{float(result.S[i]):>11.4e}  {float(result.I[i]):>11.4e}  {heat}")
    note = _special_note(result, include_special)
    if note:
        lines.append(f"({note})")
    return "\n".join(lines)


def heat_strip(result: Attribution | Aggregation, color: bool = True, include_special: bool = False) -> str:
    """The context in reading order, each token (or unit) tinted by its score over the largest one.

    Without colour each piece reads ``[text|fraction]``.
    """
    shown = _shown(result, include_special)
    labels = _labels(result)
    top = max((float(result.scores[i]) for i in shown), default=0.0)
    parts = []
    for i in shown:
        x = _fraction(float(result.scores[i]), top)
        text = labels[i] if not hasattr(result, "unit") else labels[i] + " "
        parts.append(f"\x1b[48;5;{_xterm(x)}m\x1b[30m{text}\x1b[0m" if color else f"[{labels[i]}|{x:.2f}]")
    return "".join(parts)


def heat_map(result: MultiAttribution, max_rows: int | None = None, include_special: bool = False) -> str:
    """Context tokens down, targets across; each cell is the score over its target's largest score.

    ``*`` marks a target's own position; blank cells lie outside a target's context. With
    ``max_rows`` only the first and last positions are shown (a quarter from the start).
    """
    K, n = len(result), len(result.context_ids)
    lines = [f"{K} targets over {n} context tokens, backend {result.backend}; "
             "cell = score / the target's largest score, * = the target itself"]
    legend = [f"{k:>3}: {t} {tok!r}" for k, (t, tok) in enumerate(zip(result.targets, result.target_tokens,
                                                                      strict=True))]
    column = max(len(entry) for entry in legend)
    for start in range(0, K, 4):
        lines.append("  ".join(f"{entry:<{column}}" for entry in legend[start:start + 4]).rstrip())
    special = set() if include_special else set(result.special_positions)
    scores = result.scores.clone()
    scores[:, sorted(special)] = float("nan")
    top = torch.nan_to_num(scores, nan=0.0).amax(dim=1).clamp_min(1e-30) if n else torch.ones(K)
    positions = [i for i in range(n) if i not in special]
    width = min(16, max([5] + [len(repr(result.context_tokens[i])) for i in positions]))
    lines.append(f"{'pos':>5}  {'token':<{width}}  " + " ".join(str(k % 10) for k in range(K)))
    shown: list[int | None] = positions
    if max_rows is not None and len(positions) > max_rows:
        head = max(1, max_rows // 4)
        shown = positions[:head] + [None] + positions[len(positions) - (max_rows - head):]
    for i in shown:
        if i is None:
            lines.append(f"{'...':>5}  ({len(positions) - max_rows} positions not shown)")
            continue
        cells = []
        for k, t in enumerate(result.targets):
            if i == t:
                cells.append("*")
            elif i > t:
                cells.append(" ")
            else:
                level = round(float(scores[k, i]) / float(top[k]) * (len(_BLOCKS) - 1))
                cells.append(_BLOCKS[min(len(_BLOCKS) - 1, max(1, level))])  # never blank inside a context
        token = repr(result.context_tokens[i])
        token = token if len(token) <= width else token[:width - 1] + "…"
        lines.append((f"{i:>5}  {token:<{width}}  " + " ".join(cells)).rstrip())
    if special:
        lines.append(f"({len(special)} special token{'s' if len(special) > 1 else ''} left out)")
    return "\n".join(lines)


def _xterm(x: float) -> int:
    """xterm-256 colour from white (0) to deep red (1)."""
    ramp = [231, 224, 217, 210, 203, 196, 160]
    return ramp[min(len(ramp) - 1, max(0, int(x * (len(ramp) - 1) + 0.5)))]


# --- HTML ------------------------------------------------------------------------------------


_CSS = """
.heta{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#fff;max-width:64em;
  padding:.5em 1em;line-height:1.5}
.heta h2{font-size:1.15em;margin:.2em 0}
.heta .meta,.heta .note{color:#666;font-size:.85em;margin:.2em 0}
.heta .controls{font-size:.9em;margin:.4em 0}
.heta label{margin-right:1em;cursor:pointer;font-size:.9em}
.heta input[type=radio]{margin:0 .25em 0 0}
.heta .text{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:15px;line-height:2;
  border:1px solid #ddd;padding:.5em;white-space:pre-wrap;word-break:break-word}
.heta .tok{background:var(--scores);color:var(--fg-scores);padding:1px 0;border-radius:2px;cursor:help}
.heta .tok.unit{padding:1px 2px}
.heta .ws{opacity:.5}
.heta .tok.target{outline:2px solid #1f5fbf;background:#dbe8ff;color:#222;font-weight:bold;padding:1px 3px;
  margin-left:2px}
.heta .legend{margin:.5em 0;font-size:.8em;display:flex;align-items:center;gap:.5em}
.heta .legend .bar{width:16em;height:.9em;border:1px solid #ccc;background:linear-gradient(to right,RAMP)}
.heta .legend .top{display:none}
.heta table.hm{border-collapse:collapse;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
.heta table.hm td{width:1.4em;height:1.4em;border:1px solid #fff;background:var(--scores);cursor:help}
.heta table.hm td.out{background:#eee}
.heta table.hm td.self{background:#dbe8ff;text-align:center;color:#1f5fbf}
.heta table.hm th{font-weight:normal;white-space:pre;padding:0 .3em}
.heta table.hm th.col{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;padding:.3em 0}
.heta table.hm th.row{text-align:right}
.heta table.hm th.axis{font-weight:bold;font-family:system-ui,sans-serif}
.heta table.hm th.yaxis{writing-mode:vertical-rl;transform:rotate(180deg)}
"""


def _toggle_css(page: str) -> str:
    """CSS for the component toggle: the checked radio picks which colour variable paints the tokens."""
    rules = []
    for name in COMPONENTS:
        rules.append(f"#{page}-{name}:checked~.view .tok:not(.target),#{page}-{name}:checked~.view td.in"
                     f"{{background:var(--{name});color:var(--fg-{name})}}")
        rules.append(f"#{page}-{name}:checked~.legend .top-{name}{{display:inline}}")
    return "\n".join(rules)


def _colour(x: float) -> str:
    """``#rrggbb`` for ``x`` in ``[0, 1]`` on the white-to-dark-red ramp."""
    for (x0, c0), (x1, c1) in itertools.pairwise(_RAMP):
        if x <= x1:
            w = (x - x0) / (x1 - x0)
            return "#" + "".join(f"{round(a + (b - a) * w):02x}" for a, b in zip(c0, c1, strict=True))
    return "#" + "".join(f"{c:02x}" for c in _RAMP[-1][1])


def visible(text: str) -> str:
    """HTML for a token's text: escaped, its whitespace drawn as dim ``·``, ``↵`` (then a line break), ``⇥``."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(f'<span class="ws">{_VISIBLE[ch]}</span>' + ("\n" if ch == "\n" else ""))
        else:
            out.append(_html.escape(ch, quote=True))
    return "".join(out)


def _attr(text: str) -> str:
    return _html.escape(text, quote=True).replace("\n", "&#10;")


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4g}"


def _title(label: str, values: dict[str, float], extra: str = "") -> str:
    parts = [f"{label!r}{extra}", *(f"{_LABELS[name]} = {_num(values[name])}" for name in COMPONENTS)]
    return _attr("\n".join(parts))


def _style(values: dict[str, float], tops: dict[str, float]) -> str:
    """CSS variables: ``--NAME`` the background for each component, ``--fg-NAME`` a readable text colour on it."""
    fractions = {name: _fraction(values[name], tops[name]) for name in COMPONENTS}
    return ";".join(f"--{name}:{_colour(x)};--fg-{name}:{'#fff' if x > 0.6 else '#222'}"
                    for name, x in fractions.items())


def _controls(page: str) -> str:
    radios = "".join(f'<input type="radio" name="{page}-c" id="{page}-{name}"{" checked" if name == "scores" else ""}>'
                     f'<label for="{page}-{name}">{_LABELS[name]}</label>' for name in COMPONENTS)
    return f'<span class="controls">colour by: </span>{radios}'


def _legend(tops: dict[str, float], what: str, hover: str) -> str:
    tops_html = "".join(f'<span class="top top-{name}">{_num(tops[name])}</span>' for name in COMPONENTS)
    return (f'<div class="legend"><span>{_attr(what)}: 0</span><span class="bar"></span>{tops_html}'
            f'<span>(hover a {hover} for score, M, S and I)</span></div>')


def _values(result, i: int) -> dict[str, float]:
    return {name: float(getattr(result, name)[i]) for name in COMPONENTS}


def _text_view(result, page: str, include_special: bool) -> str:
    """Tokens (or units) in reading order, the target after them."""
    source = _attribution(result)
    shown = _shown(result, include_special)
    tops = {name: max((float(getattr(result, name)[i]) for i in shown), default=0.0) for name in COMPONENTS}
    pieces = []
    if hasattr(result, "unit"):
        gaps_from = 0
        for u, (a, b) in enumerate(result.spans):
            if source.text is not None and u:  # the whitespace between units (spaces, line breaks) as is
                gap = source.text[gaps_from:a]
                pieces.append("".join(ch for ch in gap if ch.isspace()) or (" " if gap else ""))
            tokens = ", ".join(repr(source.context_tokens[i]) for i in result.members[u])
            pieces.append(f'<span class="tok unit" style="{_style(_values(result, u), tops)}" '
                          f'title="{_title(result.texts[u], _values(result, u), f" (tokens {tokens})")}">'
                          f'{_html.escape(result.texts[u])}</span>')
            gaps_from = b
        pieces.append(" ")
    else:
        for i in shown:
            pieces.append(f'<span class="tok" style="{_style(_values(result, i), tops)}" '
                          f'title="{_title(result.context_tokens[i], _values(result, i), f" at {i}")}">'
                          f'{visible(result.context_tokens[i])}</span>')
    pieces.append(f'<span class="tok target" title="{_attr(f"target {source.target_token!r} at {source.target_pos}")}"'
                  f'>{visible(source.target_token)}</span>')
    what = "score" if not hasattr(result, "unit") else f"{result.reducer} over {result.unit}"
    hover = "token" if not hasattr(result, "unit") else result.unit[:-1]
    return (f'{_controls(page)}{_legend(tops, what, hover)}<div class="view"><div class="text">{"".join(pieces)}'
            f'</div></div>')


def _matrix_view(result: MultiAttribution, page: str, include_special: bool) -> str:
    """Targets down, context tokens across; each cell coloured by its value over the row's largest."""
    special = set() if include_special else set(result.special_positions)
    columns = [i for i in range(len(result.context_ids)) if i not in special]
    head = "".join(f'<th class="col" title="{_attr(repr(result.context_tokens[i]) + f" at {i}")}">'
                   f'{visible(result.context_tokens[i])}<span class="ws"> {i}</span></th>' for i in columns)
    rows = []
    for k, t in enumerate(result.targets):
        inside = [i for i in columns if i < t]
        tops = {name: max((float(getattr(result, name)[k, i]) for i in inside), default=0.0) for name in COMPONENTS}
        cells = []
        for i in columns:
            if i == t:
                cells.append('<td class="self" title="the target itself">*</td>')
            elif i > t:
                cells.append('<td class="out"></td>')
            else:
                values = {name: float(getattr(result, name)[k, i]) for name in COMPONENTS}
                extra = f" at {i} for target {result.target_tokens[k]!r} at {t}"
                cells.append(f'<td class="in" style="{_style(values, tops)}" '
                             f'title="{_title(result.context_tokens[i], values, extra)}"></td>')
        rows.append(f'<tr><th class="row">{visible(result.target_tokens[k])}<span class="ws"> {t}</span></th>'
                    f'{"".join(cells)}</tr>')
    axis = (f'<tr><th></th><th></th><th class="axis" colspan="{len(columns)}">context token (position)</th></tr>'
            f'<tr><th class="axis yaxis" rowspan="{len(result) + 1}">target (position)</th><th></th>{head}</tr>')
    table_html = f'<table class="hm">{axis}{"".join(rows)}</table>'
    tops = {name: 1.0 for name in COMPONENTS}
    return (f'{_controls(page)}{_legend(tops, "value over the row largest", "cell")}'
            f'<div class="view">{table_html}</div>')


def html(result: Attribution | MultiAttribution | Aggregation, include_special: bool = False,
         fragment: bool = False) -> str:
    """A self-contained HTML page (``fragment``: one ``<div>`` with its own style, for notebooks).

    Attribution/Aggregation: the context coloured by score (toggle: M, S, I), the target marked.
    MultiAttribution: the targets x context heat map.
    """
    page = f"heta{next(_page_ids)}"
    multi = hasattr(result, "targets")
    source = result if multi else _attribution(result)
    if multi:
        title = f"HETA: {len(result)} targets over {len(result.context_ids)} context tokens"
        body = _matrix_view(result, page, include_special)
        note = (f"{len(result.special_positions)} special tokens left out"
                if result.special_positions and not include_special else None)
    else:
        title = f"HETA: why {source.target_token!r} at position {source.target_pos}"
        body = _text_view(result, page, include_special)
        note = _special_note(result, include_special)
    config = source.config
    meta = (f"backend {source.backend}, seed {config.get('seed')}, samples {config.get('samples')}, "
            f"mask {config.get('mask')}, hessian {config.get('hessian', 'exact')}; "
            f"score = {formula(config.get('beta'), config.get('gamma'), config.get('mix', 'raw'))}")
    css = (_CSS.replace("RAMP", ",".join(f"{_colour(x)} {100 * x:.0f}%" for x, _ in _RAMP))
           + _toggle_css(page)).replace(".heta", f"#{page}")
    div = (f'<div class="heta" id="{page}"><style>{css}</style><h2>{_html.escape(title)}</h2>'
           f'<p class="meta">{_html.escape(meta)}</p>{body}'
           + (f'<p class="note">{_html.escape(note)}</p>' if note else "") + "</div>")
    if fragment:
        return div
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_html.escape(title)}</title>'
            f"</head><body>{div}</body></html>\n")


def save_html(page: str, path: str | os.PathLike) -> None:
    """Write an HTML page to ``path`` as UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


# --- matplotlib ------------------------------------------------------------------------------


def figure_class() -> type[Figure]:
    """matplotlib's ``Figure`` class; ModuleNotFoundError naming the ``plot`` extra when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError("figures need matplotlib: pip install 'heta_fast[plot]'") from None
    return Figure


def _plain(text: str) -> str:
    """A label for matplotlib: the repr (whitespace visible), ``$`` escaped so it is not mathtext."""
    return repr(text).replace("$", r"\$")


def figure(result: Attribution | MultiAttribution | Aggregation, k: int = 12, include_special: bool = False) -> Figure:
    """A matplotlib ``Figure`` ready for ``savefig``.

    Attribution/Aggregation: horizontal bars of the ``k`` best tokens (units), each score split
    into its Hessian and KL terms (``heta_fast.mix.terms``: ``M*beta*S`` and ``M*gamma*I``, with
    ``S`` and ``I`` at unit sum under the normalised mix), which add up to it (an Aggregation with
    reducer ``max`` draws the score alone). MultiAttribution: the targets x context heat map,
    each row over its largest score.
    """
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    Figure = figure_class()
    if hasattr(result, "targets"):
        return _heat_figure(Figure, result, include_special)
    source = _attribution(result)
    shown = _shown(result, include_special)
    order = sorted(shown, key=lambda i: (-float(result.scores[i]), i))[:k]
    labels = _labels(result)
    beta, gamma = source.config.get("beta", 0.5), source.config.get("gamma", 0.5)
    mix = source.config.get("mix", "raw")  # results saved before the option existed were raw
    hessian, kl = terms(Components(source.M, source.S, source.I), beta, gamma, mix)
    if hasattr(result, "unit"):
        if result.reducer == "max":
            hessian = kl = None
        else:
            reduce = torch.sum if result.reducer == "sum" else torch.mean
            hessian = torch.stack([reduce(hessian[m]) for m in result.members]) if len(result) else hessian[:0]
            kl = torch.stack([reduce(kl[m]) for m in result.members]) if len(result) else kl[:0]
    fig = Figure(figsize=(6.4, 0.9 + 0.32 * max(1, len(order))), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(order)))[::-1]
    if hessian is None:
        ax.barh(y, [float(result.scores[i]) for i in order], color="#d7301f", label="score")
    else:
        h = [float(hessian[i]) for i in order]
        S, I = ("S/ΣS", "I/ΣI") if mix == "normalised" else ("S", "I")
        ax.barh(y, h, color="#fc8d59", label=f"M·β·{S} (Hessian), β = {beta:g}")
        ax.barh(y, [float(kl[i]) for i in order], left=h, color="#7f0000", label=f"M·γ·{I} (KL), γ = {gamma:g}")
    ax.set_yticks(y, [f"{_plain(labels[i])} {i}" for i in order])
    unit = "token (position)" if not hasattr(result, "unit") else f"{result.unit[:-1]} (index)"
    ax.set_ylabel(unit)
    ax.set_xlabel("HETA score" + ("" if not hasattr(result, "unit") else f" ({result.reducer})"))
    ax.set_title(f"why {_plain(source.target_token)} at position {source.target_pos}: "
                 f"top {len(order)} of {len(shown)}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _heat_figure(Figure, result: MultiAttribution, include_special: bool):
    special = set() if include_special else set(result.special_positions)
    columns = [i for i in range(len(result.context_ids)) if i not in special]
    matrix = result.scores[:, columns].double()
    top = torch.nan_to_num(matrix, nan=0.0).amax(dim=1, keepdim=True).clamp_min(1e-30)
    shown = (matrix / top).numpy()
    fig = Figure(figsize=(min(16.0, 1.5 + 0.28 * len(columns)), 1.6 + 0.3 * len(result)), layout="constrained")
    ax = fig.add_subplot()
    import matplotlib as mpl  # only reached once figure_class() found it

    cmap = mpl.colormaps["OrRd"].with_extremes(bad="#eeeeee")
    image = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(columns)), [f"{_plain(result.context_tokens[i])} {i}" for i in columns], rotation=90,
                  fontsize=8)
    ax.set_yticks(range(len(result)), [f"{_plain(tok)} {t}" for t, tok in zip(result.targets, result.target_tokens,
                                                                               strict=True)], fontsize=8)
    ax.set_xlabel("context token (position)")
    ax.set_ylabel("target (position)")
    fig.colorbar(image, ax=ax, label="score / row maximum")
    return fig
