"""What every ``heta-fast`` subcommand shares: HETAConfig options, byte counts, model checks.

``heta_fast.cli`` (the entry point and its ``SUBCOMMANDS``) and the subcommands that live with
their features (``heta_fast.jobs.cli``, ``heta_fast.evaluation.cli``) import from here, so no
subcommand has to import the entry point that registers it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import typing
from collections.abc import Callable, Iterator

import torch

from heta_fast.config import OPTION_GROUPS, PRESETS, HETAConfig, field_names

EMBEDDED_NAME = "the embedded SmolLM2-135M-Instruct"

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


# Named parsers a config field's metadata may ask for instead of its own type.
_PARSERS: dict[str, Callable[[str], object]] = {"bytes": parse_bytes}


def option_name(field: str) -> str:
    """The command-line flag of a HETAConfig field: ``window_size`` -> ``--window-size``."""
    return "--" + field.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One option per ``HETAConfig`` field, from the field's metadata, in ``OPTION_GROUPS``' groups.

    Each option stores under the field's name with default None (left out: HETAConfig's default,
    named in the help). Booleans get ``--x/--no-x``. Returns the groups by key, so a command can
    add its own options next to them (``--device`` under ``run``). ``config_from_args`` reads them back.
    """
    groups = {key: parser.add_argument_group(title) for key, title in OPTION_GROUPS.items()}
    groups["method"].add_argument("--preset", choices=tuple(PRESETS), default=None,
                                  help="start from a named configuration: paper (the method as defined), exact "
                                       "(the defaults), fast (cheaper than occlusion) or fixed (a fixed number "
                                       "of passes); other options apply on top")
    hints = typing.get_type_hints(HETAConfig)
    for field in dataclasses.fields(HETAConfig):
        meta = field.metadata
        flags = [option_name(field.name)] + ([meta["short"]] if meta.get("short") else [])
        help_text = meta["help"] if field.default is None else f"{meta['help']} (default {field.default})"
        kwargs: dict = {"dest": field.name, "default": None, "help": help_text}
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _PARSERS[meta["type"]] if meta.get("type") else kind
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        groups[meta.get("group", "method")].add_argument(*flags, **kwargs)
    return groups


def config_from_args(args: argparse.Namespace) -> HETAConfig:
    """The ``HETAConfig`` the options describe; options left out keep HETAConfig's defaults.

    Raises ValueError/TypeError (from HETAConfig) for bad values, before any model is loaded.
    """
    given = {name: getattr(args, name) for name in field_names() if getattr(args, name, None) is not None}
    preset = getattr(args, "preset", None)
    return HETAConfig.preset(preset, **given) if preset else HETAConfig(**given)


@contextlib.contextmanager
def transformers_output(quiet: bool) -> Iterator[None]:
    """Hide transformers' own loading bars (we draw our own progress), and its warnings too when quiet."""
    try:
        from transformers.utils import logging as hf_logging  # transformers takes seconds to import: on use
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


def check_device(name: str | None) -> None:
    """Fail before the model loads when ``--device`` names nothing usable."""
    if name is None:
        return

    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch says "Expected one of cpu, cuda, ..." as a RuntimeError
        raise ValueError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")


def check_model_folder(name: str | None) -> None:
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
