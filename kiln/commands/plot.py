"""`kiln plot RUN_DIR [RUN_DIR ...] --out FILE`: overlay the curves of several runs."""

from __future__ import annotations

import argparse

from kiln.runs import ExitCode

HELP = "overlay the loss, LR and eval curves of runs in one PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", required=True, metavar="FILE", help="the PNG to write")
    p.add_argument(
        "--metrics",
        metavar="NAMES",
        help="comma-separated panels (default: loss, lr and every eval metric), "
        "e.g. loss,val_accuracy",
    )


def run(args: argparse.Namespace) -> int:
    from kiln.plots import plot_runs

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = plot_runs(args.run_dirs, args.out, metrics=metrics or None)
    print(f"wrote {out}")
    return ExitCode.FINISHED
