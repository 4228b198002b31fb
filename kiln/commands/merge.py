"""`kiln merge RUN_DIR OUT`: fold a LoRA run's adapters into its base, for transformers alone."""

from __future__ import annotations

import argparse

HELP = "merge a LoRA run's adapters into the base model (loadable without PEFT)"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR", help="a LoRA run directory, or its final/")
    p.add_argument(
        "out",
        metavar="OUT",
        help="directory to write the merged model to (outside the run and the adapter)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (only once the merged model is completely written)",
    )


def run(args: argparse.Namespace) -> int:
    from kiln.models.merge import merge_adapter

    out = merge_adapter(args.path, args.out, overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0
