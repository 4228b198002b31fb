"""Subcommands of the `kiln` command line, one module each.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`
(the exit code); `kiln.cli.COMMANDS` lists the modules in the order `kiln --help` shows them.
Modules are imported when the parser is built, so keep their top-level imports light (import
torch, transformers or an optional extra inside `run`).
"""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The `CONFIG [key=value ...]` arguments shared by the commands that read a run config."""
    p.add_argument("config", help="YAML run config")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3"
    )
