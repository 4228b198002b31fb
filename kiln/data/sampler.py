"""Data order: a pure function of (seed, epoch), walked by a sample-level cursor.

The training order of epoch `e` is `epoch_permutation(n, seed, e)`. A position in training is
(epoch, cursor), where `cursor` counts samples already taken in that epoch, so a resumed run
rebuilds the permutation and continues at `perm[cursor:]` in O(1), with no batches replayed.

When shuffling, the last partial batch of each epoch is dropped: every step then sees a full
batch (same shapes, same loss weighting), and the dropped samples differ from epoch to epoch.

With `lengths` (`data.group_by_length`), the epoch order is `grouped_permutation`: the same
seeded permutation, cut into mega-batches of `MEGA_BATCHES` global batches, each sorted by length
so a batch holds examples of similar length (less padding), with the batch order then shuffled by
the same generator. Still a pure function of (seed, epoch): resume stays O(1) and exact.

For data parallelism each rank takes its own slice of a global batch of
`batch_size * world_size` samples; the cursor counts global samples, so it is the same on all
ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from kiln.errors import DataError

__all__ = [
    "MEGA_BATCHES",
    "BatchCursor",
    "batches_per_epoch",
    "epoch_permutation",
    "grouped_permutation",
    "sequential_batches",
]

_U64 = (1 << 64) - 1

MEGA_BATCHES = 50
"""Batches per length-sorted group in `grouped_permutation`."""


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Mix seed and epoch into one 64-bit generator seed (distinct for nearby seeds and epochs).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) & _U64)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the `n` samples in `epoch`: a (n,) int64 permutation, fixed by (seed, epoch).

    Uses its own CPU generator, so it neither reads nor disturbs torch's global RNG.
    """
    return torch.randperm(n, generator=_epoch_generator(seed, epoch))


def grouped_permutation(lengths: Tensor, batch_size: int, seed: int, epoch: int) -> Tensor:
    """A length-grouped order of the samples in `epoch`, fixed by (seed, epoch).

    Takes `epoch_permutation`, sets aside its tail of `n % batch_size` samples (the partial
    batch, which a drop-last epoch leaves out: still a random choice), cuts the rest into
    mega-batches of `MEGA_BATCHES * batch_size`, sorts each by length (descending, stable),
    then shuffles the order of the batches within each mega-batch with the same generator.

    Args:
        lengths: (n,) length of each sample.
        batch_size: the global batch size (samples per optimizer micro-step over all ranks).
        seed: the run seed.
        epoch: the epoch.

    Returns:
        An (n,) int64 permutation whose consecutive `batch_size` slices hold similar lengths.
    """
    n = len(lengths)
    gen = _epoch_generator(seed, epoch)
    perm = torch.randperm(n, generator=gen)
    keep = n - n % batch_size
    mega = MEGA_BATCHES * batch_size
    parts = []
    for start in range(0, keep, mega):
        chunk = perm[start : min(start + mega, keep)]
        order = torch.sort(lengths[chunk], descending=True, stable=True).indices
        batches = chunk[order].view(-1, batch_size)  # (batches, batch_size), longest first
        parts.append(batches[torch.randperm(len(batches), generator=gen)].flatten())
    parts.append(perm[keep:])
    return torch.cat(parts)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches in one epoch of `n` samples: floor(n / batch_size), or ceil without drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def sequential_batches(n: int, batch_size: int) -> Iterator[Tensor]:
    """Indices of `n` samples in order, `batch_size` at a time, the last batch possibly short.

    For evaluation, where the order does not matter and every sample counts.
    """
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n))


class BatchCursor:
    """Shuffled training batches from a position (epoch, cursor), across epochs without end.

    `next_indices()` returns the sample indices of the next batch and advances the position;
    the trainer saves `state_dict()` with its checkpoint and resumes with
    `BatchCursor(..., epoch=e, cursor=c)` (or `load_state_dict`).

    Args:
        n: number of samples.
        batch_size: samples per batch, per rank.
        seed: the run seed.
        epoch: epoch to start in.
        cursor: samples of that epoch already taken.
        rank: this process's rank (data parallel).
        world_size: number of ranks.
        lengths: (n,) sample lengths: group batches by length (`grouped_permutation`).

    Raises:
        DataError: the dataset holds fewer samples than one global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        epoch: int = 0,
        cursor: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: Tensor | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise DataError(
                f"the training set has {n} examples, fewer than one batch of {self.global_batch}; "
                "lower train.batch_size or add data"
            )
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} samples")
        self.lengths = lengths
        self.epoch, self.cursor = 0, 0
        self.last_epoch = epoch
        """The epoch the last batch was drawn from (`epoch` may have moved on since)."""
        self._perm: Tensor | None = None
        self._perm_epoch = -1
        self.load_state_dict({"epoch": epoch, "cursor": cursor})

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the partial one is dropped)."""
        return batches_per_epoch(self.n, self.global_batch)

    def _permutation(self) -> Tensor:
        if self._perm_epoch != self.epoch:  # one randperm per epoch, not per batch
            if self.lengths is None:
                self._perm = epoch_permutation(self.n, self.seed, self.epoch)
            else:
                self._perm = grouped_permutation(
                    self.lengths, self.global_batch, self.seed, self.epoch
                )
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self, eligible: Callable[[int], Tensor] | None = None) -> Tensor:
        """This rank's (batch_size,) sample indices for the next batch; advances the position.

        After the last full batch of an epoch the position moves to (epoch + 1, 0).

        `eligible(epoch)` (curriculum learning) gives an (n,) bool mask of the samples that may
        be drawn now: the batch is then the next `global batch` eligible samples of the epoch's
        order, the cursor moves past the last one taken, and the epoch ends when fewer than a
        global batch of eligible samples remain.

        Raises:
            DataError: fewer eligible samples in a whole epoch than one global batch.
        """
        if eligible is not None:
            return self._next_eligible(eligible)
        self.last_epoch = self.epoch
        start = self.cursor + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size]
        self.cursor += self.global_batch
        if self.cursor + self.global_batch > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        return indices

    def _next_eligible(self, eligible: Callable[[int], Tensor]) -> Tensor:
        while True:
            rest = self._permutation()[self.cursor :]
            mask = eligible(self.epoch)
            if mask.shape != (self.n,):
                raise ValueError(f"eligible mask has shape {tuple(mask.shape)}, not ({self.n},)")
            positions = mask[rest].nonzero().squeeze(1)  # offsets into rest of eligible ones
            if len(positions) >= self.global_batch:
                break
            if self.cursor == 0:
                raise DataError(
                    f"only {len(positions)} of {self.n} training examples are eligible in "
                    f"epoch {self.epoch} (data.curriculum), fewer than one batch of "
                    f"{self.global_batch}; loosen the curriculum or lower train.batch_size"
                )
            self.epoch, self.cursor = self.epoch + 1, 0  # the rest cannot fill a batch
        self.last_epoch = self.epoch
        taken = positions[: self.global_batch]
        mine = taken[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        indices = rest[mine]
        self.cursor += int(taken[-1]) + 1
        if len(positions) - self.global_batch < self.global_batch:
            self.epoch, self.cursor = self.epoch + 1, 0  # no full batch left in this epoch
        return indices

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        """The position, {"epoch", "cursor"}: all that a resume needs besides the config."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to a saved position."""
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or cursor < 0:
            raise ValueError(f"bad position epoch={epoch}, cursor={cursor}")
        if cursor + self.global_batch > self.n:
            # A position saved at the end of an epoch resumes at the start of the next one.
            epoch, cursor = epoch + 1, 0
        self.epoch, self.cursor = epoch, cursor
