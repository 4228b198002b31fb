"""The `sweep:` section of a sweep file: a kiln run config plus what to search (`kiln sweep`)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, field_validator, model_validator

from kiln.config.base import MAX_COUNT, MAX_SECONDS, Section, short_repr

__all__ = ["MAX_GRID", "MAX_VALUES", "PrunerConfig", "SweepConfig", "space_key"]


MAX_VALUES = 10_000
"""Values a list in `sweep.space` may hold (a categorical choice, or one axis of a grid)."""
MAX_GRID = 100_000
"""Points a grid may have (the product of its lists' lengths)."""
_MAX_STEPS = 1e15
"""Steps a range with a `step` may have."""
_MAX_INT = 2**53
"""Bound of an integer range's ends: beyond it a sampled value is no longer exact as a float
(and numpy's integer sampling overflows)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A number that is neither nan nor inf (and an int Optuna can hold)."""
    if isinstance(value, int):
        return abs(value) <= _MAX_INT
    return math.isfinite(value)


def space_key(key: Any) -> str:
    """A space key as a message shows it: as written when it is short and printable, else its
    cut repr (a key may hold newlines or be thousands of characters long)."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 60 else short_repr(text)


def _list_problem(values: list[Any]) -> str | None:
    """What is wrong with a list of values to try (`: ...`), or None."""
    if not values:
        return ": an empty list of values"
    if len(values) > MAX_VALUES:
        return f": {len(values)} values; at most {MAX_VALUES}"
    seen = set()
    for i, value in enumerate(values):
        # Optuna stores categorical choices as JSON scalars.
        if value is not None and not isinstance(value, str | int | float | bool):
            return (
                f"[{i}]: each value must be a number, a string, true/false or null; "
                f"got {short_repr(value)}"
            )
        if _is_number(value) and not _finite(value):
            return f"[{i}]: must be a finite number, got {short_repr(value)}"
        marker = (type(value), value)
        if marker in seen:
            return f"[{i}]: {short_repr(value)} is listed twice"
        seen.add(marker)
    return None


def _range_problem(spec: Any) -> str | None:
    """What is wrong with a range `{low, high, log, step}` (`.key: ...` or `: ...`), or None."""
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
        return f": expected a list of values or {{low, high}}, got {short_repr(spec)}"
    extra = sorted(map(str, set(spec) - {"low", "high", "log", "step"}))
    if extra:
        return f": unknown keys {short_repr(extra)} (low, high, log, step)"
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name in ("low", "high"):
        if not _is_number(spec[name]) or not _finite(spec[name]):
            got = short_repr(spec[name])
            return f".{name}: must be a finite number (an integer within 2**53), got {got}"
    if low >= high:
        return f": low < high, two numbers; got {low!r}, {high!r}"
    if not math.isfinite(high - low):
        return f": the range {low!r} .. {high!r} is too wide to sample"
    if not isinstance(log, bool):
        return f".log: expected true or false, got {short_repr(log)}"
    if log and low <= 0:
        return f".log: true needs low > 0, got {low!r}"
    if step is None:
        return None
    if log:
        return ".step: a log range cannot have a step (Optuna samples it continuously)"
    integers = isinstance(low, int) and isinstance(high, int)
    if not _is_number(step) or not _finite(step) or (integers and not isinstance(step, int)):
        kind = "an integer" if integers else "a finite number"
        return f".step: must be {kind} > 0, got {short_repr(step)}"
    if step <= 0:
        return f".step: must be > 0, got {step!r}"
    if step > high - low:
        return f".step: {step!r} is wider than the range {low!r} .. {high!r}"
    if (high - low) / step > _MAX_STEPS:  # Optuna's decimal arithmetic fails beyond
        return f".step: {step!r} cuts {low!r} .. {high!r} into more than {_MAX_STEPS:.0e} steps"
    return None


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
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of the sampler (the trials use the config's own `seed`): trial N's candidate is
    drawn from (seed, N), so a sweep is reproducible and its workers never replay each
    other's candidates."""
    timeout_s: float | None = Field(None, gt=0.0, le=MAX_SECONDS)
    """Wall-clock bound of one `kiln sweep` run (Optuna's `timeout`): when it runs out, no
    trial starts and the running ones pause with a checkpoint (exit 3); running the command
    again continues. null: no bound."""
    pruner: PrunerConfig = PrunerConfig()
    """Early stopping of trials (see PrunerConfig)."""
    plots: Annotated[bool, Strict()] = True
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
        problems = []
        for key, spec in space.items():
            where = f"sweep.space.{space_key(key)}"
            if isinstance(spec, dict) and set(spec) == {"values"}:
                spec = spec["values"]
                where += ".values"
            problem = _list_problem(spec) if isinstance(spec, list) else _range_problem(spec)
            if problem:
                problems.append(f"{where}{problem}")
        if problems:
            raise ValueError("\n".join(problems))
        return space

    @model_validator(mode="after")
    def _grid_is_lists(self) -> SweepConfig:
        if self.method == "grid":
            ranges = [k for k in self.space if not isinstance(self.values(k), list)]
            if ranges:
                raise ValueError(
                    f"sweep.space.{space_key(ranges[0])}: grid search needs a list of values, "
                    "not a range"
                )
            points = math.prod(len(self.values(k)) for k in self.space)
            if points > MAX_GRID:  # Optuna lists (and shuffles) every point up front
                raise ValueError(f"sweep.space: a grid of {points} points; at most {MAX_GRID}")
        return self

    def values(self, key: str) -> list[Any] | dict[str, Any]:
        """The values to try for `key` (a list), or its range (a dict)."""
        spec = self.space[key]
        return spec["values"] if isinstance(spec, dict) and set(spec) == {"values"} else spec
