"""Subcommands of the `kiln` command line, one module each.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`
(the exit code); `kiln.cli.COMMANDS` lists the modules in the order `kiln --help` shows them.
Modules are imported when the parser is built, so keep their top-level imports light (import
torch, transformers or an optional extra inside `run`).
"""

from __future__ import annotations

import argparse

MODEL_PATH = "a run directory (its final/, else its newest checkpoint), final/ or a checkpoint"


def add_config_args(
    p: argparse.ArgumentParser, help: str = "YAML run config", *, optional: bool = False
) -> None:
    """The `CONFIG [key=value ...]` arguments shared by the commands that read a run config."""
    p.add_argument("config", help=help, nargs="?" if optional else None)
    add_overrides(p)


def add_overrides(p: argparse.ArgumentParser, what: str = "dotted overrides") -> None:
    """`[key=value ...]`: config overrides."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{what}, e.g. optim.lr=1e-3")


def add_path(p: argparse.ArgumentParser, name: str, metavar: str, help: str) -> None:
    """A positional path argument."""
    p.add_argument(name, metavar=metavar, help=help)


def add_flag(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off option."""
    p.add_argument(flag, action="store_true", help=help)
