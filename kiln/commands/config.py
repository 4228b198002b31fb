"""`kiln config validate|explain CONFIG`.

`validate` checks what `kiln train` checks before it loads anything: the config's values, then
what it names (`kiln.preflight`: data files and globs, model and tokenizer directories, the
extras it needs, the checkpoint `checkpoint.resume: auto` or `--resume` would continue). The run
directory depends on how the run is started: given `--overwrite` or `--resume`, validate
checks it as `kiln train` with the same flags would (exit 2 when refused); without either, an
earlier run in output_dir is a warning line (the config is valid, and `kiln train` will need
`--overwrite` or `--resume`), and the rest of the rule (output_dir not a file, the checkpoint
`checkpoint.resume: auto` continues) is checked as usual.
"""

from __future__ import annotations

import argparse
import logging

from kiln.commands import add_config_args, add_flag
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.preflight import preflight, run_dir_problems
from kiln.runs import ExitCode

HELP = "check or explain a config"

log = logging.getLogger("kiln")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", required=True, parser_class=type(p))
    validate = sub.add_parser(
        "validate", help="validate a config and the files, directories and extras it names"
    )
    add_config_args(validate)
    add_flag(validate, "--overwrite", "check the run directory as `kiln train --overwrite` would")
    validate.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR|CHECKPOINT",
        help="check the run directory and the checkpoint as `kiln train --resume` would",
    )
    explain = sub.add_parser("explain", help="resolved config, batch and token counts, LR schedule")
    add_config_args(explain)
    explain.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="ranks the run will have (1)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.config_command == "validate":
        if args.overwrite or args.resume is not None:
            preflight(cfg, overwrite=args.overwrite, resume=args.resume)
        else:  # whether an earlier run may be replaced is up to the flags `kiln train` gets
            preflight(cfg, overwrite=True)
            for line in run_dir_problems(cfg):
                log.warning("warning: %s", line)
        print(f"{args.config}: ok")
        return ExitCode.FINISHED
    from kiln.explain import explain

    if args.nproc < 1:
        raise KilnError(f"--nproc: must be >= 1, got {args.nproc}")
    print(explain(cfg, world_size=args.nproc))
    return ExitCode.FINISHED
