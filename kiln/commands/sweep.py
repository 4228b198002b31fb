"""`kiln sweep SWEEP.yaml [key=value ...] [--storage URL]`, `kiln sweep status DIR`,
`kiln sweep report DIR`: hyperparameter search (docs/sweeps.md).

A sweep file is a run config plus a `sweep:` section; every trial is a `kiln train` run in
`<sweep dir>/trials/<NNNN>/`. Running the same command again continues the sweep: finished
trials are kept and interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json

from kiln.commands import add_overrides

HELP = "search hyperparameters (Optuna): each trial a kiln train run, resumable"


STORAGE_HELP = (
    "Optuna storage (sqlite:///sweep.db, postgresql+psycopg://...); default: a journal file in "
    "the sweep directory"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = "a sweep file to run or continue; or status DIR, report DIR"
    p.add_argument("target", metavar="SWEEP.yaml|status|report", help=target)
    add_overrides(p, "dotted overrides of the file (sweep.* for the sweep section)")
    p.add_argument("--storage", metavar="URL", help=STORAGE_HELP)


def run(args: argparse.Namespace) -> int:
    from kiln import sweep
    from kiln.errors import KilnError

    if args.target in ("status", "report"):
        if len(args.overrides) != 1:
            raise KilnError(f"kiln sweep {args.target} DIR: give one sweep directory")
        if args.target == "status":
            print(sweep.status(args.overrides[0], args.storage))
        else:
            print(f"wrote {sweep.report(args.overrides[0], args.storage)}")
        return 0
    summary = sweep.run(args.target, list(args.overrides), storage=args.storage)
    print(json.dumps(summary, indent=1))
    return 0
