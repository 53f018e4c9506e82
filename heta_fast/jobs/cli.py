"""``heta-fast attribute-dataset IN --out OUT``: the command line of ``attribute_dataset``.

    heta-fast attribute-dataset prompts.jsonl --out scores.jsonl --hessian gauss_newton
    heta-fast attribute-dataset prompts.csv --out scores.parquet --text-column sentence
    heta-fast attribute-dataset prompts.parquet --out scores.jsonl --engine ray --actors 8 --address auto

Exit codes as for every command (heta_fast.cli): 0 when the job ran (rows that failed are error
records in the output and counted in the summary), 2 for bad input, 130 when interrupted
(rows written so far stay; run the same command again to resume).
"""

from __future__ import annotations

import argparse

from heta_fast.cli_options import (
    EMBEDDED_NAME,
    add_config_options,
    check_device,
    check_model_folder,
    config_from_args,
    transformers_output,
)
from heta_fast.jobs import ENGINES, attribute_dataset
from heta_fast.jobs.io import FORMATS, Columns

EXIT_OK = 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "attribute-dataset", help="attribute every row of a JSONL, CSV or Parquet file (resumable)",
        description="Attribute every row of IN (JSONL, CSV or Parquet; one job per row with an id and text, "
                    "prompt + answer, or chat messages) and append one record per row to OUT. Rows already in "
                    "OUT are skipped, so rerunning the command resumes a stopped job.")
    parser.add_argument("input", metavar="IN", help="input file: .jsonl, .csv or .parquet")
    parser.add_argument("--out", "-o", required=True, metavar="OUT", help="output file (appended to; resumable)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: parquet for a .parquet OUT, jsonl otherwise)")
    parser.add_argument("--model", metavar="NAME_OR_PATH", default=None,
                        help=f"a transformers causal LM folder or hub name; default: {EMBEDDED_NAME}")

    cols = parser.add_argument_group("input columns")
    for role in Columns.__dataclass_fields__:
        cols.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column", metavar="NAME",
                          default=role, help=f"the {role} column (default {role!r})")

    groups = add_config_options(parser)  # every HETAConfig field, as for `attribute`
    run = groups["run"]
    run.add_argument("--engine", choices=ENGINES, default="local",
                     help="local: this process, one model (default); ray: Ray Data actors, one model each")
    run.add_argument("--device", default=None, help="torch device for the model (default: the CPU)")
    run.add_argument("--retry-errors", action="store_true",
                     help="run rows again whose earlier attempt left an error record (default: skip them)")
    run.add_argument("--actors", type=int, default=2, help="ray: number of actors, one model each (default 2)")
    run.add_argument("--threads-per-actor", type=int, default=1, help="ray: torch threads per actor (default 1)")
    run.add_argument("--gpus-per-actor", type=float, default=None,
                     help="ray: GPUs per actor (default: 1 when the cluster has a GPU for every actor, else 0)")
    run.add_argument("--address", default=None,
                     help="ray: the cluster to join (e.g. auto or ray://head:10001); default: a local instance")
    run.add_argument("--batch-size", type=int, default=8, help="ray: rows per batch sent to an actor (default 8)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary on stderr")
    parser.set_defaults(handler=run_attribute_dataset)


def run_attribute_dataset(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    columns = Columns(**{role: getattr(args, f"{role}_column") for role in Columns.__dataclass_fields__})
    check_device(args.device)
    check_model_folder(args.model)
    with transformers_output(args.quiet):
        attribute_dataset(args.input, args.out, model=args.model, config=config, columns=columns,
                          format=args.format, engine=args.engine, retry_errors=args.retry_errors, quiet=args.quiet,
                          device=args.device, actors=args.actors, threads=args.threads_per_actor,
                          gpus=args.gpus_per_actor, address=args.address, batch_size=args.batch_size)
    return EXIT_OK
