"""Merge ``heta-fast eval`` record folders (runs split over processes) into one report per protocol.

An (example, method) pair that two folders both hold counts once, from the first folder given.

    python -m benchmarks.eval_report --out eval_records predicted=/tmp/run/predicted,/tmp/run/exact chat=/tmp/run/chat

Writes ``summary_PROTOCOL.{json,md}`` and ``figure_PROTOCOL.png`` to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from heta_fast.evaluation import runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("runs", nargs="+", metavar="PROTOCOL=DIR[,DIR...]")
    args = parser.parse_args()
    for spec in args.runs:
        protocol, folders = spec.split("=", 1)
        records = runner.read_records(*(Path(f) / runner.RECORDS for f in folders.split(",")))
        records = [r for r in records if r["protocol"] == protocol]
        summary = runner.report(records, protocol, args.out, data=folders)
        print(runner.markdown(summary, f"{protocol} protocol"), "\n")


if __name__ == "__main__":
    main()
