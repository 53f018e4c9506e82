"""What every benchmark script shares: the machine, the commit, the load, the prompts and the curated set.

Prompts: by default the text the project ships (``benchmarks/data/prompts.txt``: short
narrative sentences, science sentences, questions and answers, about 1,200 SmolLM2 tokens), so a
clean clone can rerun every benchmark. The paper's curated QA set (docs/method.md §8) is not
shipped; a script that uses it takes ``--curated PATH`` and stops with a clear message when the
file is not there, instead of measuring something else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHIPPED_PROMPTS = REPO / "benchmarks" / "data" / "prompts.txt"


def machine() -> dict:
    """Interpreter, library versions, threads and CPU model of this run."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    return info


def commit() -> dict:
    """The commit the benchmark ran on and whether tracked files differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    try:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = [line.split(maxsplit=1)[-1] for line in status.splitlines()]
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty), "dirty_files": dirty}
    except OSError:
        return {"commit": "unknown", "dirty": None}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    return [round(x, 2) for x in os.getloadavg()]


def add_curated_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--curated PATH``: the paper's curated QA set (``curated_qa_100.json``), not shipped here."""
    parser.add_argument("--curated", type=Path, default=None, required=required, metavar="PATH",
                        help="the paper's curated QA set (curated_qa_100.json; not shipped with the repository)"
                             + ("" if required else "; default: the prompts in benchmarks/data/prompts.txt"))


def check_curated(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Read ``--curated`` once before any model work; a missing or malformed file ends the run with
    ``parser.error`` (one ``error:`` line, exit code 2), not a traceback after the model has loaded."""
    if args.curated is not None:
        try:
            curated_examples(args.curated)
        except (OSError, ValueError) as error:
            parser.error(str(error))


def curated_examples(path: Path) -> list[dict]:
    """The examples of the curated QA set at ``path``; ``FileNotFoundError``/``ValueError`` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--curated {path}: no such file. The curated QA set (curated_qa_100.json, from the "
                                "paper's release) is not shipped with heta_fast; pass the path of your copy")
    try:
        examples = json.loads(path.read_text())["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"--curated {path}: not the curated QA set (expected a JSON object with "
                         f"'examples'): {error}") from None
    return examples


def prompt_text(curated: Path | None = None) -> tuple[str, str]:
    """A long text to cut prompts from, and where it came from.

    curated None: the shipped prompts; else the curated examples joined as
    ``input_text\\nAnswer: answer`` paragraphs (the text of earlier BENCHMARKS.md runs).
    """
    if curated is None:
        return SHIPPED_PROMPTS.read_text(), str(SHIPPED_PROMPTS.relative_to(REPO))
    parts = [f"{e['input_text']}\nAnswer: {e['answer']}" for e in curated_examples(curated)]
    return "\n\n".join(parts), str(Path(curated).resolve())


def prompt_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    """Exactly ``n + 1`` token ids from the start of ``text`` (``n`` context tokens and the target): ``[n + 1]``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n + 1:
        raise ValueError(f"the prompt text has {len(ids)} tokens, fewer than the {n + 1} needed")
    return torch.tensor(ids[: n + 1], dtype=torch.long)


def save_json(path: Path, figures: dict) -> None:
    """Write a benchmark's figures to ``path`` (folders made as needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    print(f"wrote {path}")
