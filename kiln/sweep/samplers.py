"""The sweep's samplers: Optuna's, seeded per trial so that workers never replay each other,
and a grid that leaves stopping to the controller. Imported only once Optuna is (the
`sweep` extra)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, GridSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

__all__ = ["ControllerGrid", "PerTrialSeed", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s candidate in a sweep seeded `seed` (a 32-bit integer)."""
    digest = hashlib.sha256(f"kiln.sweep:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeed(BaseSampler):
    """A sampler that draws trial N's candidate with a fresh inner sampler seeded from
    (sweep seed, N).

    One sampler seeded once replays its sequence in every process that makes it: a second
    controller, an agent, or the same sweep run again after a kill would propose exactly the
    candidates already tried. Trial numbers are unique in a study, so seeding per trial gives
    every worker its own draws, and a sweep run by one controller stays reproducible from its
    seed. The samplers wrapped (random, TPE, GP, CMA-ES) keep what they learn in the study,
    not in the object, so a fresh one per trial loses nothing but caches.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner: dict[int, BaseSampler] = {}

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        inner = self._inner.get(trial.number)
        if inner is None:
            # Only the trials in flight keep theirs (after_trial drops it).
            inner = self._inner[trial.number] = self._make(trial_seed(self._seed, trial.number))
        return inner

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._inner.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial's draws are seeded from the sweep's seed."""


class ControllerGrid(GridSampler):
    """Optuna's grid, without its `Study.stop()` once every point was asked: that works only
    inside `Study.optimize`, which a sweep does not use (it raised a RuntimeError after the
    last trial); the controller stops by itself when the study holds every point."""

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Nothing: see the class."""
