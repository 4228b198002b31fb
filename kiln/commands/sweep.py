"""`kiln sweep SWEEP.yaml [key=value ...] [--storage URL]`, `kiln sweep status DIR`,
`kiln sweep report DIR`, `kiln sweep agent --storage URL --study NAME`: hyperparameter search
(docs/sweeps.md).

A sweep file is a run config plus a `sweep:` section; every trial is a `kiln train` run in
`<sweep dir>/trials/<NNNN>/`. Running the same command again continues the sweep: finished
trials are kept and interrupted ones resume from their checkpoints. Exit 3: the sweep paused
(SIGTERM, Ctrl-C or `sweep.timeout_s`) with trials left. An agent, on any machine
that reaches the storage, joins a sweep by its study name and runs trials there too.
"""

from __future__ import annotations

import argparse
import json

from kiln.commands import add_overrides
from kiln.runs import ExitCode

HELP = "search hyperparameters (Optuna): each trial a kiln train run, resumable"


STORAGE_HELP = (
    "Optuna storage (sqlite:///sweep.db, postgresql+psycopg://..., or a journal file's path); "
    "default: a journal file in the sweep directory"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = "a sweep file to run or continue; or status DIR, report DIR, agent"
    p.add_argument("target", metavar="SWEEP.yaml|status|report|agent", help=target)
    add_overrides(p, "dotted overrides of the file (sweep.* for the sweep section)")
    p.add_argument("--storage", metavar="URL", help=STORAGE_HELP)
    agent = p.add_argument_group("kiln sweep agent: join a sweep from another process or machine")
    agent.add_argument("--study", metavar="NAME", help="the sweep's study (its config's name)")
    agent.add_argument(
        "--workers", type=int, metavar="N", help="trials at once here (sweep.workers)"
    )
    agent.add_argument("--dir", metavar="DIR", help="where trials run (default: the sweep's own)")
    agent.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for the study to exist (60)",
    )


def run(args: argparse.Namespace) -> int:
    from kiln import sweep
    from kiln.errors import KilnError

    if args.target == "agent":
        if args.storage is None or args.study is None or args.overrides:
            raise KilnError(
                "kiln sweep agent --storage URL --study NAME: both are needed, and nothing "
                "else (the sweep's definition comes from the study)"
            )
        if args.workers is not None and args.workers < 1:
            raise KilnError(f"--workers: at least 1, got {args.workers}")
        summary = sweep.agent(
            args.storage, args.study, workers=args.workers, directory=args.dir, wait_s=args.wait
        )
        print(json.dumps(summary, indent=1))
        return _exit_code(summary)
    if args.study is not None or args.workers is not None or args.dir is not None:
        raise KilnError("--study, --workers and --dir are for kiln sweep agent")
    if args.target in ("status", "report"):
        if len(args.overrides) != 1:
            raise KilnError(f"kiln sweep {args.target} DIR: give one sweep directory")
        if args.target == "status":
            print(sweep.status(args.overrides[0], args.storage))
        else:
            print(f"wrote {sweep.report(args.overrides[0], args.storage)}")
        return ExitCode.FINISHED
    summary = sweep.run(args.target, list(args.overrides), storage=args.storage)
    print(json.dumps(summary, indent=1))
    return _exit_code(summary)


def _exit_code(summary: dict) -> int:
    """0 when the sweep ended; 3 when it paused with trials left (SIGTERM, Ctrl-C,
    sweep.timeout_s): the same command continues it."""
    return ExitCode.PAUSED if summary.get("paused") else ExitCode.FINISHED
