"""`kiln train CONFIG [key=value ...] [--overwrite] [--resume [CHECKPOINT]]`."""

from __future__ import annotations

import argparse

from kiln.commands import add_config_args
from kiln.config import load_config

HELP = "train a model described by a config"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in the same output_dir"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of the run, or from CHECKPOINT",
    )


def run(args: argparse.Namespace) -> int:
    from kiln.engine import Trainer
    from kiln.engine.signals import EXIT_STOPPED

    cfg = load_config(args.config, args.overrides)
    result = Trainer.from_config(cfg, overwrite=args.overwrite, resume=args.resume).fit()
    s = result.summary
    if result.final_dir is None:  # paused by SIGTERM/SIGINT after writing a checkpoint
        where = result.checkpoint_paths[-1] if result.checkpoint_paths else result.run_dir
        print(f"\nstopped at step {s['steps']} ({s['stop_reason']}); checkpoint: {where}")
        print(f"continue with: kiln train {args.config} --resume")
        return EXIT_STOPPED
    val = s["final_val"]
    print(f"\nrun directory: {result.run_dir}")
    print(
        f"steps {s['steps']}  tokens {s['tokens']:,}  {s['wall_time_s']:.1f}s  "
        f"{s['tokens_per_s']:,.0f} tok/s"
    )
    if val:
        first = result.metrics[0]
        print(
            f"val_loss {first['val_loss']:.4f} (step {first['step']}) -> "
            f"{val['val_loss']:.4f} (step {s['steps']}), perplexity {val['val_ppl']:.2f}"
        )
    print(f"final model: {result.final_dir}")
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    return 0
