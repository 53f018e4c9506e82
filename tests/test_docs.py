"""The repository stands on its own: no path out of it, citations that resolve, every module placed.

Reads the files as text from the repository root; nothing is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks"}
TEXT = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ""}


def text_files() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP or p.endswith(".egg-info") for p in parts) or parts[:2] == ("benchmarks", "results"):
            continue
        if path.is_file() and path.suffix in TEXT:
            found.append(path)
    return found


def test_nothing_refers_to_a_path_outside_the_repository():
    outside = re.compile(r"\.\./shared|HETA_SPEC|/work/")
    hits = []
    for path in text_files():
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            # a path a user passes as an argument (or CI as an optional input) may be shown
            if outside.search(line) and not any(arg in line for arg in ("--curated", "--data", "HETA_PAPER_CURATED")):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "references out of the repository:\n" + "\n".join(hits)


def method_sections() -> set[str]:
    text = (ROOT / "docs" / "method.md").read_text()
    return set(re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE))


def test_method_citations_name_sections_that_exist():
    sections = method_sections()
    assert sections == {str(i) for i in range(11)}
    cited = re.compile(r"docs/method\.md`{0,2}\s*§(\d+)(?:\s*-\s*§?(\d+))?")
    seen, bad = 0, []
    for path in text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in cited.finditer(line):
                seen += 1
                bad += [f"{path.relative_to(ROOT)}:{number}: §{n}" for n in match.groups() if n and n not in sections]
    assert seen >= 10 and not bad, bad


def test_architecture_names_the_owner_of_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for folder, shown in ((ROOT / "heta_fast", "heta_fast/"), (ROOT / "kernels", "kernels/")):
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if relative.name in ("__init__.py", "_common.py"):
                continue
            name = shown + relative.as_posix()
            short = relative.as_posix()
            if name not in text and f"`{short}`" not in text and f" {short}" not in text:
                missing.append(name)
    assert not missing, f"docs/architecture.md does not place: {missing}"
