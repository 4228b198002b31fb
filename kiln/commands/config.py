"""`kiln config validate|explain CONFIG`."""

from __future__ import annotations

import argparse

from kiln.commands import add_config_args
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.runs import ExitCode

HELP = "check or explain a config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", required=True, parser_class=type(p))
    add_config_args(sub.add_parser("validate", help="validate a config (exit 2 if bad)"))
    explain = sub.add_parser("explain", help="resolved config, batch and token counts, LR schedule")
    add_config_args(explain)
    explain.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="ranks the run will have (1)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.config_command == "validate":
        print(f"{args.config}: ok")
        return ExitCode.FINISHED
    from kiln.explain import explain

    if args.nproc < 1:
        raise KilnError(f"--nproc: must be >= 1, got {args.nproc}")
    print(explain(cfg, world_size=args.nproc))
    return ExitCode.FINISHED
