"""Training batches built ahead in DataLoader worker processes (`data.loader_workers`).

The loop's data cursor (`BatchCursor`) stays the one source of the order and of the position a
checkpoint saves. A `Prefetcher` walks a copy of it ahead of the loop: each position it passes
becomes a key (the cursor's state before the draw, the epoch drawn from, the indices), which a
`torch.utils.data.DataLoader` hands to its workers; each worker builds the batch with the same
`Batcher` over the same dataset (forked: the memory maps and tensors are shared, nothing is
pickled) and the DataLoader returns them in key order. The loop still draws every batch from
its own cursor and takes the prefetched one only when its key is that draw: the batches, and so
the training, are the same as without workers, bit for bit, whatever the number of workers, and
a resume (a new cursor) simply starts the workers from the resumed position.

A draw the copy cannot foresee (a curriculum's eligible samples depend on the step; after a
rollback, samples are left out) is built in the loop's own process.
"""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from kiln.data.collate import Batcher
from kiln.data.sampler import BatchCursor

__all__ = ["Prefetcher"]

Key = tuple[dict[str, int], int, Tensor]
"""(the cursor's state before the draw, the epoch drawn from, the drawn indices)"""


class _Batches(torch.utils.data.Dataset):
    """key -> (key, batch): what a worker builds (the loop's `Batcher` over its dataset)."""

    def __init__(self, batcher: Batcher, data_for: Callable[[int], Any]) -> None:
        self.batcher, self.data_for = batcher, data_for

    def __getitem__(self, key: Key) -> tuple[Key, dict[str, Tensor]]:  # type: ignore[override]
        _, epoch, indices = key
        return key, self.batcher(self.data_for(epoch), indices)


def _keys(ahead: BatchCursor) -> Iterator[Key]:
    while True:
        before = ahead.state_dict()
        indices = ahead.next_indices()
        yield before, ahead.last_epoch, indices


def _start_worker(_: int) -> None:
    # Ctrl-C and torchrun's SIGTERM are the training process's to handle (it checkpoints);
    # a worker ends with it (the DataLoader's watchdog), never runs its handlers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _identity(item: Any) -> Any:
    return item


class Prefetcher:
    """Batches of `batcher(data_for(epoch), indices)` built ahead by `workers` processes.

    Args:
        batcher: the loop's `Batcher`.
        data_for: epoch -> the dataset its batches are gathered from (the training set, or
            augmentation's view of that epoch).
        workers: DataLoader worker processes (>= 1).
        depth: batches each worker builds ahead (the DataLoader's `prefetch_factor`).
        pin_memory: batches come in page-locked memory (a CUDA device: the copy overlaps).
    """

    def __init__(
        self,
        batcher: Batcher,
        data_for: Callable[[int], Any],
        workers: int,
        *,
        depth: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.source = _Batches(batcher, data_for)
        self.workers, self.depth, self.pin_memory = workers, depth, pin_memory
        self._stream: Iterator[tuple[Key, dict[str, Tensor]]] | None = None
        self.starts = 0
        """How many times the workers were started (at the first batch, after a jump)."""

    def take(
        self, cursor: BatchCursor, before: dict[str, int], indices: Tensor
    ) -> dict[str, Tensor]:
        """The batch the loop just drew: `indices` from `cursor`, whose state before the draw
        was `before`. Built ahead when the workers' copy of the cursor is at that draw; else
        the workers restart from `before` (a resumed or rewound cursor) and build it."""
        for attempt in range(2):
            if self._stream is None or attempt:
                self._start(cursor, before)
            assert self._stream is not None
            key, batch = next(self._stream)
            if key[0] == before:
                if not torch.equal(key[2], indices):  # the copy drew what the loop drew
                    raise RuntimeError("prefetched batch indices differ from the loop's draw")
                return batch
        raise RuntimeError(f"the prefetch workers cannot reach the data position {before}")

    def _start(self, cursor: BatchCursor, before: dict[str, int]) -> None:
        self.close()
        ahead = copy.copy(cursor)  # (its permutation is replaced per epoch, never changed)
        ahead.load_state_dict(before)
        self._stream = iter(
            torch.utils.data.DataLoader(
                self.source,
                batch_size=None,
                sampler=_keys(ahead),  # type: ignore[arg-type]
                num_workers=self.workers,
                prefetch_factor=self.depth,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
                worker_init_fn=_start_worker,
            )
        )
        self.starts += 1

    def close(self) -> None:
        """End the worker processes (they also end with this process)."""
        stream, self._stream = self._stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
