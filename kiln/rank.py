"""The rank context: the one place that knows about `torch.distributed`.

At world size 1 (no process group) every method is a no-op, so the single-process loop runs the
same code that N ranks will. Only the main rank writes the run directory, checkpoints, progress,
trackers and notifications; every rank saves its own RNG state.

Each rank keeps its `Whereabouts`: the last collective it entered (by name and purpose) and the
loop's position. When a collective times out or a peer dies, the error becomes one
`CollectiveFailed` line saying where this rank was, raised on every surviving rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError, first_line

__all__ = ["CollectiveFailed", "RankContext", "Whereabouts", "is_comm_failure"]


class CollectiveFailed(RuntimeError):
    """A collective timed out or a peer died; the message is one line saying where this rank
    was (the backend's own error is the `__cause__`)."""

    reported = False

    def report(self, rank: int) -> None:
        """Print the line, and the backend's error, on stderr; once. The trainer reports as
        soon as it knows (torchrun may SIGTERM a surviving rank a moment after a peer died)."""
        if self.reported:
            return
        self.reported = True
        print(f"kiln: {self}", file=sys.stderr)
        if self.__cause__ is not None:  # gloo's message starts with its source file: "[...] "
            cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(self.__cause__))
            print(f"kiln: rank {rank}: {cause}", file=sys.stderr, flush=True)


def is_comm_failure(exc: BaseException) -> bool:
    """Whether `exc` is the process group failing (a timeout, a closed connection): a
    `torch.distributed.DistError` (nccl), or gloo's RuntimeError, which names its source."""
    if isinstance(exc, CollectiveFailed):
        return True
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and "gloo" in str(exc).lower()


@dataclass
class Whereabouts:
    """Where this rank is, for the report when a collective fails.

    step / micro_step: the optimizer step and micro-batch being trained (1-based), or the last
    trained between steps; set from the loop's events (`kiln.callbacks.whereabouts`).
    collective: the last collective entered (`all_reduce_sum (window targets)`).
    """

    step: int = 0
    micro_step: int = 0
    collective: str | None = None

    def report(self, rank: int, during: str | None = None) -> str:
        """The one line: `rank 1: collective timed out or a peer died at step 7, micro-step 14,
        last collective all_reduce_sum (window targets)`; `during` names a failure outside
        kiln's own collectives (DDP's gradient all-reduce inside backward)."""
        where = f"step {self.step}, micro-step {self.micro_step}"
        if during is not None:
            what = during
        elif self.collective is None:
            what = "before the first collective"
        else:
            what = f"last collective {self.collective}"
        return f"rank {rank}: collective timed out or a peer died at {where}, {what}"


_WHEREABOUTS = Whereabouts()


@dataclass(frozen=True)
class RankContext:
    """Who this process is among the ranks of one job (and, in `where`, what it was doing)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def where(self) -> Whereabouts:
        """This process's whereabouts (one per process, as the process group is)."""
        return _WHEREABOUTS

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
            timeout = datetime.timedelta(seconds=timeout_s)
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)
            prefix = "default_pg"  # as init_process_group names the store it makes itself
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's own store outlives a restart: the ranks of attempt k must not read
                # the addresses attempt k - 1 left there (gloo "Connect timeout", nccl ids).
                prefix = f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{prefix}"
            store = dist.PrefixStore(prefix, store)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
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

    @contextlib.contextmanager
    def _collective(self, name: str, what: str | None) -> Iterator[None]:
        """Record `name (what)` as entered; a process-group failure inside it becomes
        `CollectiveFailed` saying where this rank was."""
        self.where.collective = name if what is None else f"{name} ({what})"
        try:
            yield
        except Exception as exc:
            if isinstance(exc, CollectiveFailed) or not is_comm_failure(exc):
                raise
            raise CollectiveFailed(self.where.report(self.rank)) from exc

    def all_reduce_sum(self, tensor: torch.Tensor, what: str | None = None) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place and on its device (no host sync). `what`
        (here and in the other collectives): its purpose, for the report if it fails."""
        if self.distributed:
            with self._collective("all_reduce_sum", what):
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_gather(self, obj: Any, what: str | None = None) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order; [obj] at world size 1."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("all_gather", what):
            torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, what: str | None = None) -> Any:
        """The main rank's `obj` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with self._collective("broadcast", what):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str | None = None) -> None:
        """Wait for every rank."""
        if self.distributed:
            with self._collective("barrier", what):
                torch.distributed.barrier()

    def failure(self, exc: BaseException) -> CollectiveFailed | None:
        """`exc` as the report of where this rank was, when it is the process group failing
        outside RankContext's own calls (torch's collectives called directly); None when it
        is not such a failure."""
        if isinstance(exc, CollectiveFailed):
            return exc
        if not (self.distributed and is_comm_failure(exc)):
            return None
        during = "backward (gradient all-reduce)" if _raised_in_backward(exc) else None
        failed = CollectiveFailed(self.where.report(self.rank, during))
        failed.__cause__ = exc
        return failed

    @contextlib.contextmanager
    def no_sync(self, model: Any, enabled: bool = True) -> Iterator[None]:
        """Skip the gradient reduction inside when `enabled` (DDP's `no_sync`; FSDP2's
        `set_requires_gradient_sync(False)`, gradients then stay unsharded until the last
        micro-batch); the last micro-batch of a window runs outside it.

        On N ranks every micro-batch's forward and backward run inside it: DDP's gradient
        all-reduce (FSDP's all-gathers and reduce-scatters) failing there becomes
        `CollectiveFailed`, naming it."""
        if not self.distributed:
            yield
            return
        fsdp = getattr(model, "set_requires_gradient_sync", None) is not None
        try:
            with _sync_off(model, enabled):
                yield
        except Exception as exc:
            if isinstance(exc, CollectiveFailed) or not is_comm_failure(exc):
                raise
            backward = _raised_in_backward(exc)
            if fsdp:
                during = (
                    "backward (FSDP reduce-scatter)" if backward else "forward (FSDP all-gather)"
                )
            else:
                during = "backward (DDP gradient all-reduce)" if backward else "forward (DDP)"
            raise CollectiveFailed(self.where.report(self.rank, during)) from exc


@contextlib.contextmanager
def _sync_off(model: Any, enabled: bool) -> Iterator[None]:
    """The model's gradient reduction off inside, when `enabled` (see `RankContext.no_sync`)."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if not enabled:
        yield
    elif set_sync is not None:  # FSDP2
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    elif getattr(model, "no_sync", None) is not None:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def _raised_in_backward(exc: BaseException) -> bool:
    """Whether `exc` escaped from autograd's engine (a `backward()` call)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_engine_run_backward":
            return True
        tb = tb.tb_next
    return False
