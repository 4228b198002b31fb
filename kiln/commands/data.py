"""`kiln data preview CONFIG`: counts kept/dropped, token lengths, rendered samples."""

from __future__ import annotations

import argparse

from kiln.commands import add_config_args
from kiln.config import load_config

HELP = "inspect the data a config trains on"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, parser_class=type(p))
    prev = sub.add_parser(
        "preview", help="counts kept/dropped, token lengths, rendered samples with loss masks"
    )
    add_config_args(prev)
    prev.add_argument("--samples", type=int, default=3, help="rendered samples to show")


def run(args: argparse.Namespace) -> int:
    from kiln.data.preview import preview

    cfg = load_config(args.config, args.overrides)
    print(preview(cfg, samples=args.samples))
    return 0
