"""The rank context: the one place that knows about `torch.distributed`.

At world size 1 (no process group) every method is a no-op, so the single-process loop runs the
same code that N ranks will. Only the main rank writes the run directory, checkpoints, progress,
trackers and notifications; every rank saves its own RNG state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RankContext"]


@dataclass(frozen=True)
class RankContext:
    """Who this process is among the ranks of one job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> RankContext:
        """The context of the initialized process group, else of torchrun's environment
        (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(dist.get_rank(), dist.get_world_size(), local)
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place and on its device (no host sync)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def no_sync(self, model: Any, enabled: bool = True) -> Iterator[None]:
        """Skip the gradient all-reduce inside (DDP's `no_sync`) when `enabled`; the last
        micro-batch of a window runs outside it."""
        sync_off = getattr(model, "no_sync", None) if enabled and self.distributed else None
        if sync_off is None:
            yield
            return
        with sync_off():
            yield
