"""Views of a result: terminal table, HTML pages (parsed, and rendered by headless Chromium), figures.

Results are built from random components (a fresh seed per run) with token texts that HTML must
escape: markup, ampersands, quotes, line breaks, leading spaces, and a special token.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from heta_fast import Attribution, MultiAttribution, render

TOKENS = ["<|im_start|>", "<b>", " &amp;", ' "quoted"', "\n", "  two", "\tTab", " ok"]
TARGET = ' <Paris & "co">'
SPECIAL = [True] + [False] * (len(TOKENS) - 1)
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


def _attribution(seed: int, n: int = len(TOKENS), target: str = TARGET) -> Attribution:
    g = torch.Generator().manual_seed(seed)
    M, S, I = (torch.rand(n, generator=g) for _ in range(3))
    M[1] = 0.0  # a zero score: the white end of the scale
    return Attribution(scores=M * (0.5 * S + 0.25 * I), M=M, S=S, I=I, context_tokens=TOKENS[:n],
                       context_ids=list(range(10, 10 + n)), target_token=target, target_id=99, target_pos=n,
                       config={"seed": 0, "beta": 0.5, "gamma": 0.25, "samples": 10, "mask": "zero"},
                       backend="torch", special=SPECIAL[:n])


def _multi(seed: int) -> MultiAttribution:
    rows = [_attribution(seed + k, n, target) for k, (n, target) in enumerate([(3, " x"), (8, TARGET), (5, "y")])]
    for row, n in zip(rows, (3, 8, 5), strict=True):
        row.context_tokens, row.context_ids = TOKENS[:n], list(range(10, 10 + n))
    return MultiAttribution.from_rows(rows, config=rows[0].config, backend="torch")


class _Page(HTMLParser):
    """Collects the token spans (text and attributes), table cells, inputs and every URL-bearing attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans: list[dict] = []
        self.cells: list[dict] = []
        self.headers: list[dict] = []
        self.inputs: list[dict] = []
        self.urls: list[str] = []
        self._open: list[dict | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action", "data")]
        item = None
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            item = {**attrs, "text": ""}
            self.spans.append(item)
        elif tag in ("td", "th"):
            item = {**attrs, "text": ""}
            (self.cells if tag == "td" else self.headers).append(item)
        elif tag == "input":
            self.inputs.append(attrs)
        if tag not in ("input", "meta"):
            self._open.append(item)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for item in self._open:
            if item is not None:
                item["text"] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _drawn(token: str) -> str:
    """A token's text as the page draws it (independent of render.visible)."""
    return "".join({" ": "·", "\n": "↵\n", "\t": "⇥"}.get(ch, ch) for ch in token)


def _colours(style: str) -> dict[str, str]:
    return dict(re.findall(r"--(scores|M|S|I):(#[0-9a-f]{6})", style))


def _assert_self_contained(page: str) -> None:
    parsed = _parse(page)
    assert parsed.urls == []
    lowered = page.lower()
    for needle in ("<script", "url(", "@import", "http:", "https:", "<link", "<img", "<iframe"):
        assert needle not in lowered, needle


def test_html_tokens_escaped_whitespace_visible_target_marked(fresh_seed):
    a = _attribution(fresh_seed)
    page = a.to_html()
    assert page.startswith("<!DOCTYPE html>")
    _assert_self_contained(page)
    for raw in ("<b>", ' "quoted"', TARGET):
        assert raw not in page  # never unescaped
    parsed = _parse(page)
    *tokens, target = parsed.spans
    # the special token is left out; whitespace is drawn: · space, ↵ line break, ⇥ tab
    assert [t["text"] for t in tokens] == ["<b>", "·&amp;", '·"quoted"', "↵\n", "··two", "⇥Tab", "·ok"]
    assert target["class"] == "tok target" and target["text"] == '·<Paris·&·"co">'
    assert "5 special" not in page and "1 special token left out" in page
    share = float(a.scores[0] / a.scores.sum())
    assert f"({100 * share:.1f}% of the total score)" in page
    # each token's title carries its position and all four values
    for i, span in zip(range(1, len(TOKENS)), tokens, strict=True):
        lines = span["title"].split("\n")
        assert lines[0] == f"{TOKENS[i]!r} at {i}"
        assert lines[1:] == [f"{label} = {float(getattr(a, name)[i]):.4g}" for name, label in
                             [("scores", "score"), ("M", "M (semantic flow)"), ("S", "S (Hessian)"),
                              ("I", "I (KL)")]]


def test_html_colours_scale_by_the_largest_shown_value(fresh_seed):
    a = _attribution(fresh_seed)
    tokens = _parse(a.to_html()).spans[:-1]
    shown = list(range(1, len(TOKENS)))
    for name in ("scores", "M", "S", "I"):
        values = getattr(a, name)[shown]
        colours = [_colours(t["style"])[name] for t in tokens]
        assert colours[int(values.argmax())] == "#7f0000"  # the top of the ramp
        for value, colour in zip(values.tolist(), colours, strict=True):
            assert colour == render._colour(value / float(values.max()))
    assert _colours(tokens[0]["style"])["scores"] == "#ffffff"  # M = 0 there: score 0, white
    # with the special token shown, it joins the scale and the note goes
    page = a.to_html(include_special=True)
    assert _parse(page).spans[0]["text"] == "<|im_start|>" and "left out" not in page


def test_html_component_toggle_is_css_only(fresh_seed):
    page = _attribution(fresh_seed).to_html()
    inputs = _parse(page).inputs
    assert [i["type"] for i in inputs] == ["radio"] * 4
    assert [i["id"].rsplit("-", 1)[1] for i in inputs] == ["scores", "M", "S", "I"]
    assert ["checked" in i for i in inputs] == [True, False, False, False]
    for i in inputs:
        name = i["id"].rsplit("-", 1)[1]
        assert f"#{i['id']}:checked~.view .tok:not(.target)" in page and f"background:var(--{name})" in page


def test_notebook_fragment(fresh_seed):
    fragment = _attribution(fresh_seed)._repr_html_()
    assert fragment.startswith('<div class="heta" id="heta') and fragment.endswith("</div>")
    assert "<html" not in fragment
    other = _attribution(fresh_seed)._repr_html_()
    assert re.search(r'id="(heta\d+)"', fragment)[1] != re.search(r'id="(heta\d+)"', other)[1]  # toggles stay apart


def test_multi_html_heat_map_axes_and_cells(fresh_seed):
    m = _multi(fresh_seed)
    page = m.to_html()
    _assert_self_contained(page)
    parsed = _parse(page)
    axes = [h["text"] for h in parsed.headers if "axis" in (h.get("class") or "")]
    assert axes == ["context token (position)", "target (position)"]
    columns = [h["text"] for h in parsed.headers if h.get("class") == "col"]
    # the special token's column is left out
    assert columns == [f"{_drawn(t)} {i}" for i, t in enumerate(TOKENS) if i]
    rows = [h["text"] for h in parsed.headers if h.get("class") == "row"]
    assert rows == ["·x 3", '·<Paris·&·"co"> 8', "y 5"]
    per_row = [parsed.cells[k * 7:(k + 1) * 7] for k in range(3)]
    for row, t in zip(per_row, m.targets, strict=True):
        kinds = [c["class"] for c in row]
        assert kinds == ["in" if i < t else "self" if i == t else "out" for i in range(1, 8)]
        inside = [c for c in row if c["class"] == "in"]
        top = max(float(m.scores[m.targets.index(t), i]) for i in range(1, t))
        for i, cell in zip(range(1, t), inside, strict=True):
            assert _colours(cell["style"])["scores"] == render._colour(float(m.scores[m.targets.index(t), i]) / top)


def test_aggregation_html_and_table():
    text = "Hello, big world"
    a = Attribution(scores=torch.tensor([1.0, 2.0, 3.0, 4.0]), M=torch.ones(4), S=torch.ones(4), I=torch.ones(4),
                    context_tokens=["Hel", "lo", ",", " big"], context_ids=[1, 2, 3, 4], target_token=" world",
                    target_id=5, target_pos=4, config={"seed": 0}, backend="torch", text=text,
                    offsets=[(0, 3), (3, 5), (5, 6), (6, 10)], special=[False] * 4)
    words = a.aggregate("words")
    spans = _parse(words.to_html()).spans
    assert [s["text"] for s in spans] == ["Hello", ",", "big", "·world"]
    assert spans[0]["title"].startswith("'Hello' (tokens 'Hel', 'lo')\nscore = 3")
    lines = str(words).splitlines()
    assert lines[0].startswith("words (reducer sum) of target ' world'")
    assert [line.split()[:3] for line in lines[2:]] == [["2", "'big'", "4.0000e+00"], ["0", "'Hello'", "3.0000e+00"],
                                                       ["1", "','", "3.0000e+00"]]


def test_table_leaves_out_special_tokens(fresh_seed):
    a = _attribution(fresh_seed)
    lines = str(a).splitlines()
    rows = [line for line in lines[2:] if not line.startswith("(")]
    assert sorted(int(r.split()[0]) for r in rows) == list(range(1, len(TOKENS)))
    assert lines[-1] == f"(1 special token left out ({100 * float(a.scores[0] / a.scores.sum()):.1f}% " \
                        "of the total score))"
    assert len(render.table(a, include_special=True).splitlines()) == 2 + len(TOKENS)


# --- figures ---------------------------------------------------------------------------------


def test_bar_figure_splits_each_score_into_its_two_terms(fresh_seed, tmp_path):
    pytest.importorskip("matplotlib")
    a = _attribution(fresh_seed)
    fig = a.plot(k=4)
    ax = fig.axes[0]
    order = [i for i, _, _ in sorted(((i, t, float(a.scores[i])) for i, t in enumerate(TOKENS) if i),
                                     key=lambda r: (-r[2], r[0]))][:4]
    hessian, kl = ax.containers
    assert [bar.get_width() for bar in hessian] == pytest.approx([float(a.M[i] * 0.5 * a.S[i]) for i in order])
    assert [bar.get_width() for bar in kl] == pytest.approx([float(a.M[i] * 0.25 * a.I[i]) for i in order])
    assert [h.get_width() + k.get_width() for h, k in zip(hessian, kl, strict=True)] == \
        pytest.approx([float(a.scores[i]) for i in order], rel=1e-6)
    labels = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    assert [labels[y] for y in sorted(labels, reverse=True)] == [f"{TOKENS[i]!r} {i}" for i in order]  # best on top
    fig.savefig(tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_normalised_mix_bars_and_formula(fresh_seed):
    """Under ``mix="normalised"`` the bars are ``M beta S/sum S`` and ``M gamma I/sum I`` (they add up to
    the score) and the page writes that formula."""
    pytest.importorskip("matplotlib")
    a = _attribution(fresh_seed)
    a.config["mix"] = "normalised"
    a.scores = a.M * (0.5 * a.S / a.S.sum() + 0.25 * a.I / a.I.sum())
    hessian, kl = a.plot(k=3).axes[0].containers
    order = sorted(range(1, len(TOKENS)), key=lambda i: (-float(a.scores[i]), i))[:3]
    assert [bar.get_width() for bar in hessian] == pytest.approx([float(a.M[i] * 0.5 * a.S[i] / a.S.sum())
                                                                   for i in order], rel=1e-6)
    assert [h.get_width() + k.get_width() for h, k in zip(hessian, kl, strict=True)] == \
        pytest.approx([float(a.scores[i]) for i in order], rel=1e-6)
    assert hessian.get_label() == "M·β·S/ΣS (Hessian), β = 0.5"
    assert "score = M × (0.5 × S/ΣS + 0.25 × I/ΣI)" in a.to_html()
    a.config["mix"] = "raw"
    assert "score = M × (0.5 × S + 0.25 × I)" in a.to_html()


def test_heat_map_figure_is_the_row_normalised_matrix(fresh_seed):
    pytest.importorskip("matplotlib")
    m = _multi(fresh_seed)
    ax = m.plot().axes[0]
    image = ax.get_images()[0].get_array()
    expected = m.scores[:, 1:].double()
    expected = expected / torch.nan_to_num(expected, nan=0.0).amax(dim=1, keepdim=True)
    assert image.shape == (3, 7)
    assert image.mask.tolist() == expected.isnan().tolist()
    torch.testing.assert_close(torch.from_numpy(image.filled(0.0)), expected.nan_to_num(0.0))
    assert ax.get_xlabel() == "context token (position)" and ax.get_ylabel() == "target (position)"


def test_figure_without_matplotlib_names_the_extra(monkeypatch, fresh_seed):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'heta_fast\[plot\]'"):
        _attribution(fresh_seed).plot()


# --- headless Chromium -----------------------------------------------------------------------


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_chromium_renders_the_page(tmp_path, fresh_seed, kind):
    image_module = pytest.importorskip("matplotlib.image")
    result = _attribution(fresh_seed) if kind == "single" else _multi(fresh_seed)
    page = tmp_path / "page.html"
    result.save_html(page)
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=800,600", page.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    pixels = image_module.imread(shot)
    assert pixels.shape[:2] == (600, 800)
    rgb = pixels[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.01  # not a blank page
    # the strongest cell is drawn in the top colour of the ramp, #7f0000
    dark_red = (abs(rgb[..., 0] - 127 / 255) < 0.03) & (rgb[..., 1] < 0.03) & (rgb[..., 2] < 0.03)
    assert dark_red.sum() > 20
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    target = result.target_token if kind == "single" else result.target_tokens[1]
    assert html.escape(target.lstrip(), quote=False).replace(" ", '<span class="ws">·</span>') in dom


def test_repr_is_the_first_ten_rows_of_the_table():
    """The dataclass's own repr (every tensor in full) must not come back over the table."""
    n = 13
    values = torch.arange(n, dtype=torch.float32)
    a = Attribution(scores=values, M=values / values.sum(), S=values, I=values,
                    context_tokens=[f"t{i}" for i in range(n)], context_ids=list(range(n)), target_token="y",
                    target_id=99, target_pos=n, config={"seed": 0}, backend="torch")
    text = repr(a)
    assert text.startswith("Attribution(\n") and text.endswith(f"\n... {n - 10} more\n)")
    assert "tensor(" not in text
    assert text.count(" 't") == 10 and str(a).count(" 't") == n  # token rows: the first ten, all in str()
