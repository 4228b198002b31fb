"""The `sweep:` section of a sweep file: a kiln run config plus what to search (`kiln sweep`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.config.base import MAX_COUNT, Section, short_repr

__all__ = ["PrunerConfig", "SweepConfig"]


class PrunerConfig(Section):
    type: Literal["none", "median", "percentile", "hyperband"] = "median"
    """Stop unpromising trials early, from the metric at their validations: median (below the
    median of earlier trials at the same step), percentile, hyperband, or none."""
    warmup_evals: int = Field(1, ge=0, le=MAX_COUNT)
    """Validations a trial reports before it may be pruned."""
    startup_trials: int = Field(2, ge=0, le=MAX_COUNT)
    """Trials that finish before any is pruned (median, percentile)."""
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    """percentile: a trial below this percentile of the others (in the metric's direction) is
    pruned."""


class SweepConfig(Section):
    method: Literal["grid", "random", "tpe", "gp", "cmaes"] = "tpe"
    """How candidates are chosen (Optuna samplers): grid (every point once; the space must be
    lists), random, tpe, gp (Gaussian process), cmaes."""
    metric: str = "val_loss"
    """The validation metric the sweep optimizes (what the trials log as val_*)."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or larger metric is better."""
    trials: int = Field(10, ge=1, le=100_000)
    """Trials to run in all (grid: at most the number of points)."""
    workers: int = Field(1, ge=1, le=1024)
    """Trial processes at once on this machine."""
    trial_nproc: int = Field(1, ge=1, le=1024)
    """Ranks per trial: above 1 each trial runs under torchrun (`kiln train --nproc`)."""
    seed: int = 0
    """Seed of the sampler (the trials use the config's own `seed`)."""
    pruner: PrunerConfig = PrunerConfig()
    """Early stopping of trials (see PrunerConfig)."""
    plots: bool = True
    """Draw report.md's plots (optimization history, parallel coordinates, parameter
    importance, validations per trial) when the sweep ends and on `kiln sweep report`; needs
    matplotlib (the `plots` extra)."""
    space: dict[str, Any]
    """Dotted config key -> what to try: a list of values (`[8, 16, 32]` or
    `{values: [...]}`), or a range `{low, high, log: false}` (integers when low and high
    are)."""

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("sweep.space: name at least one config key to search")
        for key, spec in space.items():
            where = f"sweep.space.{key}"
            if isinstance(spec, dict) and set(spec) == {"values"}:
                spec = spec["values"]
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{where}: an empty list of values")
                continue
            if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
                raise ValueError(
                    f"{where}: expected a list of values or {{low, high}}, got {short_repr(spec)}"
                )
            if set(spec) - {"low", "high", "log", "step"}:
                extra = sorted(set(spec) - {"low", "high", "log", "step"})
                raise ValueError(f"{where}: unknown keys {extra} (low, high, log, step)")
            low, high = spec["low"], spec["high"]
            numbers = all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)
            )
            if not numbers or low >= high:
                raise ValueError(f"{where}: low < high, two numbers; got {low!r}, {high!r}")
            if spec.get("log") and low <= 0:
                raise ValueError(f"{where}: log: true needs low > 0, got {low!r}")
        return space

    @model_validator(mode="after")
    def _grid_is_lists(self) -> SweepConfig:
        if self.method == "grid":
            ranges = [k for k in self.space if not isinstance(self.values(k), list)]
            if ranges:
                raise ValueError(
                    f"sweep.space.{ranges[0]}: grid search needs a list of values, not a range"
                )
        return self

    def values(self, key: str) -> list[Any] | dict[str, Any]:
        """The values to try for `key` (a list), or its range (a dict)."""
        spec = self.space[key]
        return spec["values"] if isinstance(spec, dict) and set(spec) == {"values"} else spec
