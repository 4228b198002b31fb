"""Process-wide state a run touches: the global RNGs (python, numpy, torch, CUDA), torch's
thread count, the TF32 switches, logging handlers, and (for `kiln train`'s own process) how
glibc's allocator treats freed memory (`keep_freed_memory`).

`seed_everything` seeds the RNGs; `rng_state`/`set_rng_state` capture and restore them for
checkpoints; `ProcessState` snapshots all of it before a run and puts it back after, so runs in
one process are independent (a sweep, a notebook, a test suite). Signal handlers are put back
by `kiln.engine.signals.StopSignals`, which installs them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["ProcessState", "keep_freed_memory", "rng_state", "seed_everything", "set_rng_state"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks come from the heap


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a step frees for the next step, instead of handing it back
    to the OS and page-faulting it in again.

    By default glibc trims the top of its heap and unmaps large blocks as soon as they are
    free, so every training step on the CPU faults its activations and gradients back in:
    measured on the quickstart model, 39k page faults a step (105 ms of system time) where a
    raw loop had 16k; with this, under 1k. The price is that the process keeps its peak heap
    (which a training loop reaches every step anyway); what was freed before the call is
    handed back first, so call it once setup is done (`kiln.callbacks.KeepFreedMemory` calls it
    when training begins; `kiln train` adds that callback for the process it owns). Nothing
    is changed where the user chose for themselves: a `MALLOC_*_` or `GLIBC_TUNABLES` setting
    in the environment, or another allocator preloaded (jemalloc, tcmalloc). Returns whether
    it was changed (False also where this is not glibc).
    """
    chosen = any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ)
    if chosen or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", "") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)  # what was freed so far (a run's setup) goes back: only what follows is kept
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


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
