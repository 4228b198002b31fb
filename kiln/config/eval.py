"""Validation and checkpoint sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln.config.base import Section

__all__ = ["CheckpointConfig", "EvalConfig"]


class EvalConfig(Section):
    every_steps: int | None = Field(None, gt=0)
    """Validate every N optimizer steps (and always at the end); null: only at the end."""
    max_batches: int | None = Field(None, gt=0)
    """Bound each validation to this many batches."""
    batch_size: int | None = Field(None, gt=0)
    """Validation batch size; default train.batch_size."""
    sample_prompt: str | None = None
    """Prompt to generate a sample from at the end of training (printed, and in summary.json)."""
    sample_max_new_tokens: int = Field(200, gt=0)
    """Tokens to generate for the end-of-training sample."""


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0)
    """Save a checkpoint every N optimizer steps; null: no periodic checkpoints."""
    keep_last: int = Field(3, ge=1)
    """Keep this many most recent checkpoints."""
    keep_best: int = Field(0, ge=0)
    """Also keep this many best checkpoints by `metric`."""
    metric: str = "val_loss"
    """Metric that ranks checkpoints for keep_best."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or larger `metric` is better."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue from the newest complete checkpoint in the run directory, if any."""
