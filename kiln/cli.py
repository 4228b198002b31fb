"""The `kiln` command line; each subcommand lives in `kiln.commands.<name>`.

Exit codes (`kiln.runs.ExitCode`, the README's table): 0 done; 2 bad input (config, data,
arguments, files: one line per problem on stderr, never a traceback), or refused (a run
directory in use, an output that would replace what it reads); 3 stopped by SIGTERM/SIGINT
after writing a checkpoint, or before training started when an earlier checkpoint exists, or
stopped without a final model (pruned): continue with `--resume RUN_DIR`; 4 diverged
(status.json says where); 5 the disk (or quota, or file-size limit) ran out while writing:
what was written before stays intact; 130 aborted by a second Ctrl-C, or Ctrl-C before
training started with nothing to resume; 143 SIGTERM before training started with nothing to
resume.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from kiln.engine.console import stop_console_log
from kiln.engine.signals import StoppedBeforeStart, as_stopped, stop_before_start
from kiln.errors import KilnError
from kiln.files import StorageFull
from kiln.launcher import LINES_ENV, say
from kiln.runs import ExitCode

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(ExitCode.BAD_INPUT, None if _other_rank() else f"kiln: error: {message}\n")


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of a bare `torchrun -m kiln ...` (RANK set
    and not 0). Every rank reads the same arguments and config and finds the same bad input,
    so only the main rank says it; the others exit 2 without a word. The ranks of `kiln train
    --nproc` (LINES_ENV set) still say theirs: its launcher prints each distinct line once."""
    rank = os.environ.get("RANK", "0").strip()
    return not os.environ.get(LINES_ENV) and rank.isdigit() and int(rank) != 0


COMMANDS = (
    "train",
    "sweep",
    "eval",
    "generate",
    "merge",
    "export",
    "serve",
    "report",
    "plot",
    "data",
    "config",
)
"""Subcommand modules under `kiln.commands`, in help order (see that package's docstring)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog="kiln",
        description="kiln: train transformer language models from one YAML file.",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="leave out kiln's info lines (warnings, errors, progress and results stay)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        module = _command(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return parser


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"kiln.commands.{name}")


def _flag_hint(extra: list[str]) -> str | None:
    """For a dashed flag that names a config key (`--epochs 5`, `--train.max_steps=5`): the
    message that says how to write it as a dotted override; None for other arguments."""
    from kiln.config.suggest import all_keys, closest_key

    for i, item in enumerate(extra):
        if not item.startswith("--") or len(item) < 3:
            continue
        name, sep, value = item[2:].partition("=")
        if not sep and i + 1 < len(extra) and not extra[i + 1].startswith("-"):
            value = extra[i + 1]
        name = name.replace("-", "_")
        key = name if name in all_keys() else closest_key(name, leaves_only=True)
        if key is not None:
            flag = item.partition("=")[0]
            return (
                f"unknown option {flag}; config values are dotted overrides: {key}={value or '...'}"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script; returns the exit code."""
    # First, before anything heavy loads: a SIGTERM or Ctrl-C while `kiln train` starts is
    # kiln's one line and code (3 when an earlier checkpoint can be resumed, else 143/130).
    restore = stop_before_start()
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)
    args: argparse.Namespace | None = None
    try:
        args = _parse(words)
        if args.command != "train":  # the other commands keep the default behaviour
            restore()
        return _run(args)
    except BaseException as exc:
        stop = as_stopped(exc)  # a signal during setup, even if turned into another error
        if not isinstance(stop, StoppedBeforeStart):
            raise
        if command == "train":  # it says whether there is a run to resume
            if args is None:  # stopped while parsing
                with contextlib.suppress(BaseException):  # bad arguments, a second signal
                    args = _parse(words)
            return int(_command(command).stopped(args, stop))
        say([f"kiln: stopped by {stop.name}"], stop.exit_code)  # while parsing the arguments
        return stop.exit_code
    finally:
        restore()
        stop_console_log()  # after the closing line, which RUN_DIR/train.log keeps too


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`kiln train c.yaml --overwrite a.b=1`).
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray and hasattr(args, "overrides"):
        hint = _flag_hint(extra)
        if hint:
            parser.error(hint)
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="kiln: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "huggingface_hub", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    module = _command(args.command)
    try:
        # A command's cheap checks (its config) first: a bad config is answered before
        # torch and transformers load (seconds).
        getattr(module, "check", lambda _: None)(args)
        if getattr(module, "QUIET_HF", False):
            from transformers.utils import logging as hf_logging

            # kiln draws its own progress and reports lengths itself (e.g. the warning that a
            # document is longer than model_max_length is expected before packing).
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        return int(module.run(args))
    except KilnError as exc:
        if not _other_rank():  # bad input: the main rank's line says it for all
            say([f"kiln: error: {line}" for line in str(exc).splitlines()], ExitCode.BAD_INPUT)
        # Under torchrun --max-restarts, 0: a restart would fail again (`kiln train` rank_code).
        return int(getattr(module, "rank_code", int)(ExitCode.BAD_INPUT))
    except StorageFull as exc:
        say([f"kiln: error: {exc.message()}"], ExitCode.STORAGE_FULL)
        return ExitCode.STORAGE_FULL
    except KeyboardInterrupt:  # a second Ctrl-C: aborted at once (checkpoints written stay)
        say(["kiln: interrupted"], ExitCode.ABORTED)
        return ExitCode.ABORTED


if __name__ == "__main__":
    sys.exit(main())
