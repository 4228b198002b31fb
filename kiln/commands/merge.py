"""`kiln merge RUN_DIR OUT`: fold a LoRA run's adapters into its base, for transformers alone."""

from __future__ import annotations

import argparse

from kiln.commands import add_flag, add_path
from kiln.runs import ExitCode

HELP = "merge a LoRA run's adapters into the base model (loadable without PEFT)"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path(p, "path", "RUN_DIR", "a LoRA run directory, or its final/")
    add_path(p, "out", "OUT", "directory for the merged model (outside the run and the adapter)")
    add_flag(p, "--overwrite", "replace OUT if it exists (once the merged model is fully written)")


def run(args: argparse.Namespace) -> int:
    from kiln.models.merge import merge_adapter

    out = merge_adapter(args.path, args.out, overwrite=args.overwrite)
    print(f"merged model: {out}")
    return ExitCode.FINISHED
