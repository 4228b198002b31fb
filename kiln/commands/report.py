"""`kiln report RUN_DIR`: summary table of a run, and report.md with the plots embedded."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from kiln.commands import add_flag, add_path
from kiln.files import write_atomic
from kiln.runs import ExitCode

HELP = "summarize a run directory (table, report.md with plots)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path(p, "run_dir", "RUN_DIR", "a run directory (runs/<name>)")
    add_flag(p, "--no-plots", "do not draw plots/ when the run has none (drawn with matplotlib)")


def run(args: argparse.Namespace) -> int:
    from kiln.report import load_report, render_markdown, render_table
    from kiln.runs import RunPaths

    run_dir = Path(args.run_dir)
    report = load_report(run_dir)
    drawable = report.records and importlib.util.find_spec("matplotlib") is not None
    if not report.plots and drawable and not args.no_plots:
        from kiln.plots import plot_run

        plot_run(run_dir)
        report = load_report(run_dir)
    print(render_table(report))
    out = RunPaths(run_dir).report
    write_atomic(out, render_markdown(report))
    print(f"\nreport: {out}")
    return ExitCode.FINISHED
