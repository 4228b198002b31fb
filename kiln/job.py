"""Job assembly: from a config to a trainer ready to run, the one way every entry point builds
a run (`kiln train`, `Trainer.from_config`, and later sweeps and the server).

It decides the rank context (a single process, or this rank of a torchrun job) and the
callbacks: the ones the caller passes, plus those the config asks for (progress, early
stopping, trackers, notifications, plots, export on finish) on the main rank only, since only
the main rank reports; on N ranks, every rank also keeps its whereabouts (`RankWhereabouts`).
A caller's callback replaces the default of the same class. The Trainer's constructor calls
`job_callbacks` itself, so `Trainer(cfg, ...)` runs what the config asks for too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kiln.rank import RankContext

if TYPE_CHECKING:
    from kiln.callbacks.base import Callback, CallbackList
    from kiln.config import RunConfig
    from kiln.engine.trainer import Trainer, TrainResult

__all__ = ["build_trainer", "job_callbacks", "train"]


def job_callbacks(
    cfg: RunConfig, given: Sequence[Callback], rank: RankContext, *, config: bool = True
) -> CallbackList:
    """The callbacks of a job: `given`, then the config's (`default_callbacks`, the one place
    they are built) not given by class (none on ranks other than the main one, none with
    `config=False`), then on N ranks `RankWhereabouts` on every rank (the loop's position, for
    the report when a collective fails).

    Idempotent: a list it returned, given again, comes back the same."""
    from kiln.callbacks.base import CallbackList
    from kiln.callbacks.defaults import default_callbacks
    from kiln.callbacks.whereabouts import RankWhereabouts

    callbacks = CallbackList(given)
    classes = {type(cb) for cb in callbacks}
    if rank.is_main and config:
        callbacks += [cb for cb in default_callbacks(cfg) if type(cb) not in classes]
    if rank.distributed and RankWhereabouts not in classes:
        callbacks.append(RankWhereabouts())
    return callbacks


def build_trainer(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Callback] = (),
    rank: RankContext | None = None,
    trainer_cls: type[Trainer] | None = None,
    owns_process: bool = False,
    **kwargs: Any,
) -> Trainer:
    """A trainer for `cfg` with the job's rank context; its constructor adds the callbacks the
    config asks for to `callbacks` (`job_callbacks`). `owns_process`: the process is the run's
    (`kiln train`), so glibc's allocator is pinned once training begins (`KeepFreedMemory`).
    `kwargs` go to the Trainer (model, tokenizer, train_data, val_data, config_callbacks,
    overwrite, resume)."""
    if owns_process:
        from kiln.callbacks.memory import KeepFreedMemory

        callbacks = [*callbacks, KeepFreedMemory()]
    if trainer_cls is None:
        from kiln.engine.trainer import Trainer as trainer_cls
    dist = cfg.train.distributed
    rank = rank or RankContext.setup(dist.backend, dist.timeout_s)  # under torchrun: N ranks
    return trainer_cls(cfg, callbacks=callbacks, rank=rank, **kwargs)


def train(cfg: RunConfig, **kwargs: Any) -> TrainResult:
    """Build the job for `cfg` and run it to the end (see `build_trainer`)."""
    return build_trainer(cfg, **kwargs).fit()
