"""Weights & Biases (`pip install 'kiln[wandb]'`); offline unless an API key is set."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.callbacks.loggers.base import ArtifactKind, RunContext, Status
from kiln.config.tracking import WandbOptions

__all__ = ["WandbLogger", "wandb_mode"]


def wandb_mode(opts: WandbOptions) -> str:
    """online or offline: `auto` is online only when WANDB_API_KEY is set."""
    if opts.mode != "auto":
        return opts.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    """One W&B run per kiln run, files under <run_dir>/wandb.

    A resumed kiln run continues the same W&B run (its id is kept in tracking.json). W&B keeps
    only increasing steps, so steps a killed run logged after its last checkpoint are not
    logged again by the resumed run.
    """

    name = "wandb"

    def __init__(self, opts: WandbOptions, ctx: RunContext) -> None:
        import wandb

        self._wandb = wandb
        self.opts = opts
        run_id = ctx.run_ids.get(self.name) if ctx.resumed else None
        self._run = wandb.init(
            project=opts.project,
            entity=opts.entity,
            name=opts.run_name or ctx.name,
            group=opts.group,
            tags=list(opts.tags) or None,
            dir=str(ctx.run_dir),
            mode=wandb_mode(opts),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
            settings=wandb.Settings(init_timeout=120),
        )
        self.run_id: str | None = self._run.id
        self._step = ctx.step

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._step = step
        self._run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path, kind: ArtifactKind) -> None:
        if kind == "plot":
            self._run.log({f"plots/{path.stem}": self._wandb.Image(str(path))}, step=self._step)
        elif kind == "model":
            self._run.summary["final_model"] = str(path)
            if self.opts.log_model:
                artifact = self._wandb.Artifact(f"{self._run.id}-model", type="model")
                artifact.add_dir(str(path))
                self._run.log_artifact(artifact)

    def close(self, status: Status) -> None:
        self._run.finish(exit_code=1 if status in ("failed", "diverged") else 0)
