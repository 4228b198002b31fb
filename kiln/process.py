"""Process-wide state a run touches: the global RNGs (python, numpy, torch, CUDA), torch's
thread count, the TF32 switches and logging handlers.

`seed_everything` seeds the RNGs; `rng_state`/`set_rng_state` capture and restore them for
checkpoints; `ProcessState` snapshots all of it before a run and puts it back after, so runs in
one process are independent (a sweep, a notebook, a test suite). Signal handlers are put back
by `kiln.engine.signals.StopSignals`, which installs them.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["ProcessState", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (checkpointable with `torch.save`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` output."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tf32() -> tuple[Any, ...]:
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def _set_tf32(flags: tuple[Any, ...]) -> None:
    precision, matmul, cudnn = flags
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


class ProcessState:
    """Context manager: what a run changes in the process is as it was when the block exits
    (returns or raises). Threads the run started and left running are reported as `stray`."""

    def __enter__(self) -> ProcessState:
        self._rng = rng_state()
        self._threads = torch.get_num_threads()
        self._tf32 = _tf32()
        self._handlers = {name: list(logging.getLogger(name).handlers) for name in ("", "kiln")}
        self._alive = set(threading.enumerate())
        self.stray: list[threading.Thread] = []
        return self

    def __exit__(self, *exc: object) -> None:
        set_rng_state(self._rng)
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        if _tf32() != self._tf32:
            _set_tf32(self._tf32)
        for name, handlers in self._handlers.items():
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if h not in handlers]:
                logger.removeHandler(handler)
        self.stray = [
            t
            for t in threading.enumerate()
            if t not in self._alive and t.is_alive() and not t.daemon
        ]
