"""The rank context: the one place that knows about `torch.distributed`.

At world size 1 (no process group) every method is a no-op, so the single-process loop runs the
same code that N ranks will. Only the main rank writes the run directory, checkpoints, progress,
trackers and notifications; every rank saves its own RNG state.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError

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

    @classmethod
    def setup(cls, backend: str = "auto", timeout_s: float = 1800.0) -> RankContext:
        """The context of this process; under torchrun (WORLD_SIZE > 1 in the environment) the
        process group is initialized first (backend auto: nccl with CUDA, else gloo)."""
        dist = torch.distributed
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and not dist.is_initialized():
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                if not torch.cuda.is_available():
                    raise KilnError("train.distributed.backend: nccl needs CUDA; use gloo")
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls.current()

    @staticmethod
    def teardown() -> None:
        """Destroy the process group, if one was initialized."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

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

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order; [obj] at world size 1."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main rank's `obj` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def no_sync(self, model: Any, enabled: bool = True) -> Iterator[None]:
        """Skip the gradient reduction inside when `enabled` (DDP's `no_sync`; FSDP2's
        `set_requires_gradient_sync(False)`, gradients then stay unsharded until the last
        micro-batch); the last micro-batch of a window runs outside it."""
        if not (enabled and self.distributed):
            yield
            return
        set_sync = getattr(model, "set_requires_gradient_sync", None)
        if set_sync is not None:  # FSDP2
            set_sync(False)
            try:
                yield
            finally:
                set_sync(True)
            return
        sync_off = getattr(model, "no_sync", None)
        if sync_off is None:
            yield
            return
        with sync_off():
            yield
