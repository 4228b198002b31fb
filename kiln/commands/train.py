"""`kiln train CONFIG [key=value ...] [--overwrite] [--resume [RUN_DIR|CHECKPOINT]]`.

`kiln train --resume RUN_DIR [key=value ...]` continues a run from its own config.yaml (what
ran, overrides included), so the command printed when a run pauses needs nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kiln.commands import add_config_args, add_flag
from kiln.config import RunConfig, load_config
from kiln.errors import KilnError

HELP = "train a model described by a config"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(
        p,
        "YAML run config (may be left out with --resume RUN_DIR: the run's own config)",
        optional=True,
    )
    add_flag(p, "--overwrite", "replace an earlier run in the same output_dir")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR|CHECKPOINT",
        help="continue from the newest complete checkpoint of the run, of RUN_DIR, or from "
        "CHECKPOINT; without CONFIG the run's own config.yaml is used",
    )


def _run_dir_of(path: Path) -> Path | None:
    """The run directory of a run directory or of one of its checkpoints (None: neither)."""
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return path
    if (path / "manifest.json").is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def _load(args: argparse.Namespace) -> tuple[RunConfig, str | bool | None]:
    """The config and the resume target, from CONFIG or from the run being resumed."""
    overrides = list(args.overrides)
    config, resume = args.config, args.resume
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)  # `kiln train --resume RUN_DIR key=value`
        config = None
    if config is not None and Path(config).is_dir():
        if resume not in (None, True):
            raise KilnError(f"{config}: a directory; give a config file, or --resume {config}")
        config, resume = None, config  # `kiln train RUN_DIR --resume`
    if config is not None:
        return load_config(config, overrides), resume
    if not isinstance(resume, str):
        raise KilnError("give a CONFIG, or --resume RUN_DIR to continue a run from its config")
    run_dir = _run_dir_of(Path(resume))
    if run_dir is None:
        raise KilnError(f"--resume: {resume} is not a run directory or one of its checkpoints")
    cfg = load_config(run_dir / "config.yaml", overrides)
    # The run continues where it is, wherever it was first started from.
    return cfg.model_copy(update={"output_dir": str(run_dir)}), resume


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (shorter to retype)."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def run(args: argparse.Namespace) -> int:
    from kiln.engine.signals import StoppedBeforeStart
    from kiln.engine.status import final_state
    from kiln.job import build_trainer

    cfg, resume = _load(args)
    if args.config is not None and Path(args.config).is_file():
        source = Path(args.config).resolve()
        if source == (cfg.run_dir / "config.yaml").resolve():
            raise KilnError(
                f"output_dir: {cfg.run_dir} is the folder of the config being read "
                f"({args.config}), which the run's config.yaml would replace; choose another"
            )
    try:
        result = build_trainer(cfg, overwrite=args.overwrite, resume=resume).fit()
    except StoppedBeforeStart as stop:
        if stop.resume_from is None:
            after = "nothing to resume (start it again)"
        else:
            after = f"continue with: kiln train --resume {_shown(Path(stop.resume_from))}"
        print(f"kiln: {stop}; {after}", file=sys.stderr)
        return stop.exit_code
    s = result.summary
    state, code = final_state(result.stop)
    if state != "finished":  # paused (SIGTERM/SIGINT), stopped (pruned) or diverged
        where = result.checkpoint_paths[-1] if result.checkpoint_paths else result.run_dir
        print(f"\n{state} at step {s['steps']} ({s['stop_reason']}); checkpoint: {where}")
        print(f"continue with: kiln train --resume {_shown(result.run_dir)}")
        return code
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
