"""A run that continues at another world size with the same math: each rank's share of a step.

The data order is defined over the global micro-batch (`BatchCursor`: each draw takes the next
`train.batch_size x ranks` samples of the epoch's permutation, split across the ranks in rank
order) and the checkpoint's cursor is a global sample index. With
`train.distributed.elastic.keep: global_batch` the global micro-batch (the *unit*) is kept
when the world size changes: each of W ranks draws `unit / W` samples, so every draw, every
optimizer step (`grad_accum_steps` draws) and every epoch's dropped remainder is the same at
any W. Under `vary: grad_accum_steps` a rank whose draw is larger than `train.batch_size` runs
it as several micro-batches of at most that size (the loss is token-weighted over the window,
so only the summation order changes); under `vary: batch_size` it runs the draw whole.

A world size that does not divide the unit cannot keep it: the ranks wait, without training,
for the next membership change (torchrun's agent restarts them), or pause (exit 3).

A change of world size is recorded in status.json (`world_size`, `world_size_changes`) and in
metrics.jsonl (a `{"split": "world_size"}` row at the step the run continues from).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.engine.signals import StoppedBeforeStart
from kiln.runs import CONFIG, ExitCode

if TYPE_CHECKING:
    import torch

    from kiln.config import RunConfig
    from kiln.engine.rundir import RunDir
    from kiln.engine.status import StatusFile
    from kiln.rank import RankContext

__all__ = [
    "ELASTIC_ENV",
    "SIGNALLED",
    "Shares",
    "WorldSizeRefused",
    "plan",
    "record_world",
    "saved_world",
]

log = logging.getLogger("kiln")

ELASTIC_ENV = "KILN_ELASTIC"
"""Set by `kiln train --nnodes MIN:MAX` on its ranks: a change of world size is a membership
change of an elastic launch (a node left or joined), not a resume by hand."""

SIGNALLED = "signalled"
"""The file `kiln train --nproc` leaves in its ranks' lines folder (`kiln.launcher`) when the
user signals the run: a rank of an elastic launch that gets a SIGTERM without it was stopped
by torchrun's agent for a membership change (it checkpoints; the agent restarts it), not
paused by the user. (Light to import, as `kiln.launcher` is: torch only on call.)"""

WORLD_SIZE_SPLIT = "world_size"
"""The `split` of the metrics.jsonl row that records a change of world size."""


class WorldSizeRefused(StoppedBeforeStart):
    """The world size cannot keep the global batch and the run pauses (exit 3, resumable)."""

    def __init__(self, reason: str) -> None:
        BaseException.__init__(self, reason)
        self.signum, self.name, self.resume_from = 0, "", None

    @property
    def exit_code(self) -> int:
        return ExitCode.PAUSED

    def line(self) -> str:
        after = "" if self.resume_from is None else "; continue with: kiln train --resume "
        return f"kiln: {self}{after}{self.resume_from or ''}"


@dataclass(frozen=True)
class Shares:
    """How the ranks share a step: every draw takes `unit` samples (`per_rank` each); a rank
    runs its draw as micro-batches of at most `micro` samples (None: whole)."""

    unit: int
    per_rank: int
    micro: int | None = None

    def split(self, batches: list[dict[str, torch.Tensor]], task: str) -> list[dict[str, Any]]:
        """`batches` (this rank's draws) as micro-batches of at most `micro` samples, in order.
        A preference batch (B chosen rows, then B rejected) is split by pairs."""
        if self.micro is None:
            return batches
        import torch

        out = []
        for batch in batches:
            rows = batch["input_ids"].shape[0]
            n = rows // 2 if task == "preference" else rows
            for first in range(0, n, self.micro):
                if task == "preference":
                    last = min(first + self.micro, n)
                    pick = torch.cat([torch.arange(first, last), torch.arange(n + first, n + last)])
                    out.append({k: v[pick] for k, v in batch.items()})
                else:
                    out.append({k: v[first : first + self.micro] for k, v in batch.items()})
        return out


def saved_world(checkpoint: Path) -> tuple[int, int]:
    """(the world size, the global micro-batch) a checkpoint was written at."""
    import yaml

    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("world_size", 1)
    raw = yaml.safe_load((checkpoint / CONFIG).read_text()) or {}
    batch = int((raw.get("train") or {}).get("batch_size", 8))
    return int(saved), batch * int(saved)


def plan(cfg: RunConfig, world: int, checkpoint: Path | None) -> tuple[RunConfig, Shares]:
    """The config this rank runs at `world` ranks (train.batch_size: its share of each draw)
    and how it runs its share. Without `elastic.keep` the config is kept as given.

    Raises:
        WorldSizeRefused: `world` does not divide the global micro-batch and
            `elastic.indivisible` is stop (under wait the ranks first wait; see `wait`).
    """
    el, train = cfg.train.distributed.elastic, cfg.train
    if el.keep is None:
        return cfg, Shares(train.batch_size * world, train.batch_size)
    if checkpoint is not None:
        unit = saved_world(checkpoint)[1]
    elif el.global_batch is not None:
        unit = el.global_batch // train.grad_accum_steps
    else:
        unit = train.batch_size * world
    if unit % world:
        why = (
            f"world size {world} cannot keep the global batch ({unit} x "
            f"{train.grad_accum_steps} accumulation = {unit * train.grad_accum_steps} "
            f"sequences a step: {unit} is not a multiple of {world})"
        )
        wait(why, el.indivisible, el.wait_s)
    per_rank = unit // world
    limit = el.micro_batch or train.batch_size
    micro = limit if el.vary == "grad_accum_steps" and per_rank > limit else None
    shares = Shares(unit, per_rank, micro)
    if per_rank != train.batch_size:
        how = "" if micro is None else f", run as micro-batches of at most {micro}"
        log.info(
            "global batch kept at %d x %d accumulation: %d samples per rank per draw%s",
            unit,
            train.grad_accum_steps,
            per_rank,
            how,
        )
    if per_rank == train.batch_size:
        return cfg, shares
    kept = {"micro_batch": limit} if el.vary == "grad_accum_steps" else {}
    dist = train.distributed.model_copy(update={"elastic": el.model_copy(update=kept)})
    runs = cfg.model_copy(
        update={"train": train.model_copy(update={"batch_size": per_rank, "distributed": dist})},
        deep=True,
    )
    return runs, shares


def wait(why: str, policy: str, wait_s: float) -> None:
    """Idle until torchrun's agent restarts the ranks at the next membership change (its
    SIGTERM raises `StoppedBeforeStart`), or pause after `wait_s` (policy stop: at once)."""
    if policy == "stop":
        raise WorldSizeRefused(f"{why}; train.distributed.elastic.indivisible: stop")
    log.warning("%s: waiting up to %.0f s for the next membership change", why, wait_s)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    raise WorldSizeRefused(f"{why}; no membership change within {wait_s:.0f} s")


def record_world(
    status: StatusFile,
    run_dir: RunDir,
    rank: RankContext,
    step: int,
    checkpoint: Path | None,
) -> None:
    """status.json's world size, and a change from the world size `checkpoint` was written at
    (None: a new run) in status.json and metrics.jsonl, logged once."""
    before = None if checkpoint is None else saved_world(checkpoint)[0]
    world = rank.world_size
    status.data["world_size"] = world
    if before is None or before == world:
        return
    if os.environ.get(ELASTIC_ENV):
        reason = "node joined" if world > before else "node left"
    else:
        reason = "resumed"
    change = {"step": step, "from": before, "to": world, "reason": reason, "time": time.time()}
    status.data.setdefault("world_size_changes", []).append(change)
    run_dir.log_metrics({"step": step, "split": WORLD_SIZE_SPLIT, **change})
    log.info("world size %d -> %d at step %d (%s)", before, world, step, reason)
