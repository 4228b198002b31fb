"""`DigestSet`: the documents `kiln data prepare` has seen, as 16-byte digests, in bounded memory.

`data.dedup` keeps the first of each rendered document. The streaming prepare remembers a
16-byte digest (blake2b) of every distinct document; a Python set of `bytes` costs ~100 bytes
a document (a 49-byte object plus the set's slot and spare room). `DigestSet` holds the newest
digests as two uint64 in a numpy open-addressing table (linear probing), at most half full:
16 bytes a slot, 32 to 64 bytes a digest, and at most `memory_keys` of them (8-12 MB at the
default 2^18). With a spill directory, a full table is written out as a sorted run file (16
bytes a digest) and emptied; runs of similar size are merged (a binary counter: at most
log2(n / memory_keys) + 1 runs), and a lookup that misses the table binary-searches each run
(a block index in memory, 1/32 byte a digest; the run's pages are mapped only while a chunk of
lookups runs). Memory is then the same whatever the corpus: the table, the block indices, and
a few MB of temporaries; the disk holds 16 bytes a distinct document until `close()`.
Lookups and inserts run on whole batches (numpy), not a document at a time.

The digests are the ones a set of bytes would hold, and two documents are the same iff their
digests are: the documents kept do not depend on `memory_keys` or the spills. Two different
documents share a 128-bit digest with probability about n^2 / 2^129 (10^-20 for 10^9 of them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["MEMORY_KEYS", "DigestSet", "digest_keys"]

MEMORY_KEYS = 1 << 18
"""Digests the in-memory table holds before it spills to a sorted run (with a spill directory)."""

_CHUNK = 1 << 16  # keys placed or looked up together: the temporaries stay a few MB
_BLOCK = 256  # keys a block-index entry stands for (4 KiB of a run)
_MERGE_READ = 1 << 16  # keys read from each run at a time while merging (1 MiB)
_EMPTY = np.uint64(0)  # a slot whose two words are 0 is free; the all-zero digest is kept apart


def digest_keys(digests: list[bytes]) -> np.ndarray:
    """(n, 2) uint64 keys of n 16-byte digests."""
    if any(len(d) != 16 for d in digests):
        raise ValueError("digests are 16 bytes each")
    return np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)


def _sorted(keys: np.ndarray) -> np.ndarray:
    """(n, 2) keys in key order: by word 0, then word 1."""
    return keys[np.lexsort((keys[:, 1], keys[:, 0]))]


def _count_upto(keys: np.ndarray, bound: tuple[int, int]) -> int:
    """How many of the sorted (n, 2) keys are <= `bound` (word 0, word 1)."""
    first = keys[:, 0]
    start = int(np.searchsorted(first, np.uint64(bound[0]), side="left"))
    stop = int(np.searchsorted(first, np.uint64(bound[0]), side="right"))
    return start + int(np.searchsorted(keys[start:stop, 1], np.uint64(bound[1]), side="right"))


class DigestSet:
    """A set of 128-bit digests ((n, 2) uint64 keys), added a batch at a time.

    Args:
        capacity: the table's first size in slots (rounded up to a power of two).
        spill: a directory for sorted runs (created when the first is written; removed by
            `close`); None: the table alone holds every digest (memory grows with them).
        memory_keys: digests the table holds before it spills (with `spill`; default
            `MEMORY_KEYS`).
    """

    def __init__(
        self,
        capacity: int = 1 << 12,
        *,
        spill: Path | None = None,
        memory_keys: int | None = None,
    ) -> None:
        self._first_size = 1 << max(4, (max(capacity, 1) - 1).bit_length())
        self._table = np.zeros((self._first_size, 2), dtype=np.uint64)
        self._count = 0  # keys in the table
        self._has_zero = False  # the all-zero digest (it marks free slots in the table)
        self._spill = spill
        self._memory_keys = max(1, MEMORY_KEYS if memory_keys is None else memory_keys)
        self._runs: list[_Run] = []
        self._named = 0  # run files written (names are never reused)

    def __len__(self) -> int:
        return self._count + sum(run.count for run in self._runs) + self._has_zero

    def __enter__(self) -> DigestSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        """Bytes of memory the set holds: its table and its runs' block indices."""
        return self._table.nbytes + sum(run.fence.nbytes for run in self._runs)

    @property
    def runs(self) -> int:
        """Sorted runs on disk."""
        return len(self._runs)

    def close(self) -> None:
        """Remove the spill directory and its runs (the set is empty afterwards)."""
        self._runs = []
        self._table = np.zeros((self._first_size, 2), dtype=np.uint64)
        self._count, self._has_zero = 0, False
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Add a batch of keys; a bool (n,) array: True where the key is new, i.e. neither in
        the set before nor earlier in the batch (the first of each is the one kept)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1, 2)
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        # The first of each distinct key in the batch (np.unique's index is the first one).
        _, first = np.unique(keys.view(np.dtype((np.void, 16))).ravel(), return_index=True)
        first.sort()
        zero = (keys[first, 0] == _EMPTY) & (keys[first, 1] == _EMPTY)
        if zero.any():
            if not self._has_zero:
                new[first[zero][0]] = True
                self._has_zero = True
            first = first[~zero]
        absent = first[~self._contains(keys[first])]
        for run in self._runs:
            absent = absent[~run.contains(keys[absent])]
        new[absent] = True
        self._insert(keys[absent])
        return new

    def _contains(self, keys: np.ndarray) -> np.ndarray:
        """Whether each (non-zero) key is in the table (vectorized linear probing)."""
        table, mask = self._table, np.uint64(len(self._table) - 1)
        found = np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        slots = keys[:, 0] & mask  # the digest is a hash already: its low bits spread evenly
        while todo.size:
            at = table[slots]
            hit = (at[:, 0] == keys[todo, 0]) & (at[:, 1] == keys[todo, 1])
            free = (at[:, 0] == _EMPTY) & (at[:, 1] == _EMPTY)
            found[todo[hit]] = True
            go_on = ~(hit | free)
            todo, slots = todo[go_on], (slots[go_on] + np.uint64(1)) & mask
        return found

    def _insert(self, keys: np.ndarray) -> None:
        """Insert keys that are distinct, non-zero and in neither the table nor a run."""
        while len(keys):
            room = self._memory_keys - self._count if self._spill is not None else len(keys)
            if room <= 0:
                self._spill_table()
                continue
            part, keys = keys[:room], keys[room:]
            if (self._count + len(part)) * 2 > len(self._table):
                self._grow(self._count + len(part))
            for start in range(0, len(part), _CHUNK):  # bounds the probing's temporary arrays
                self._place(part[start : start + _CHUNK])
            self._count += len(part)

    def _place(self, keys: np.ndarray) -> None:
        table, mask = self._table, np.uint64(len(self._table) - 1)
        todo = np.arange(len(keys))
        slots = keys[:, 0] & mask
        while todo.size:
            at = table[slots]
            free = (at[:, 0] == _EMPTY) & (at[:, 1] == _EMPTY)
            # Of the keys that found a free slot, one per slot takes it; the rest probe on.
            _, claim = np.unique(slots[free], return_index=True)
            taking = np.flatnonzero(free)[claim]
            table[slots[taking]] = keys[todo[taking]]
            left = np.ones(todo.size, dtype=bool)
            left[taking] = False
            todo, slots = todo[left], slots[left]
            occupied = ~free[left]  # a key whose free slot another took probes it again
            slots[occupied] = (slots[occupied] + np.uint64(1)) & mask

    def _grow(self, needed: int) -> None:
        size = len(self._table)
        while needed * 2 > size:
            size *= 2
        # The keys alone (16 bytes each), then the old table freed before the new one is made.
        old = self._keys()
        del self._table
        self._table = np.zeros((size, 2), dtype=np.uint64)
        for start in range(0, len(old), _CHUNK):
            self._place(old[start : start + _CHUNK])

    def _keys(self) -> np.ndarray:
        return self._table[(self._table[:, 0] != _EMPTY) | (self._table[:, 1] != _EMPTY)]

    def _spill_table(self) -> None:
        """Write the table's keys as a sorted run, empty the table, merge runs of like size."""
        assert self._spill is not None
        self._spill.mkdir(parents=True, exist_ok=True)
        keys = _sorted(self._keys())
        self._table = np.zeros((self._first_size, 2), dtype=np.uint64)
        self._count = 0
        self._runs.append(_Run.write(self._new_path(), [keys]))
        del keys
        while len(self._runs) > 1 and self._runs[-2].count <= 2 * self._runs[-1].count:
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append(_Run.write(self._new_path(), _merged(older, newer)))
            older.path.unlink()
            newer.path.unlink()

    def _new_path(self) -> Path:
        assert self._spill is not None
        self._named += 1
        return self._spill / f"run-{self._named:06d}.bin"


class _Run:
    """A file of distinct keys in sorted order (16 bytes each), with the first word of every
    `_BLOCK`-th key in memory (the block index: 1/32 byte a key) to find a key's block."""

    def __init__(self, path: Path, count: int, fence: np.ndarray) -> None:
        self.path, self.count, self.fence = path, count, fence

    @classmethod
    def write(cls, path: Path, chunks: Iterable[np.ndarray]) -> _Run:
        """Write the sorted record chunks (an iterable) to `path`; the run."""
        from kiln.files import writing

        count, fence = 0, []
        with writing(f"the dedup run {path}"), open(path, "wb") as file:
            for chunk in chunks:
                fence.append(chunk[(-count) % _BLOCK :: _BLOCK, 0].copy())
                file.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                count += len(chunk)
        return cls(path, count, np.concatenate(fence) if fence else np.empty(0, np.uint64))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Keys [start, stop) as (n, 2) (read, not mapped)."""
        with open(self.path, "rb") as file:
            flat = np.fromfile(file, dtype=np.uint64, count=2 * (stop - start), offset=16 * start)
        return flat.reshape(-1, 2)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Whether each of the (n, 2) keys is in the run (a binary search in its block)."""
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys) or not self.count:
            return found
        run = np.memmap(self.path, dtype=np.uint64, mode="r", shape=(self.count, 2))
        try:
            for start in range(0, len(keys), _CHUNK):
                part = keys[start : start + _CHUNK]
                # The blocks whose first key could be <= the key and whose next could be >.
                first = np.searchsorted(self.fence, part[:, 0], side="left") - 1
                last = np.searchsorted(self.fence, part[:, 0], side="right")
                lo = np.maximum(first, 0) * _BLOCK
                hi = np.minimum(last * _BLOCK, self.count)
                while (active := lo < hi).any():  # the first position whose key >= the key
                    mid = (lo + hi) // 2
                    at = run[np.where(active, mid, 0)]
                    less = (at[:, 0] < part[:, 0]) | (
                        (at[:, 0] == part[:, 0]) & (at[:, 1] < part[:, 1])
                    )
                    lo = np.where(active & less, mid + 1, lo)
                    hi = np.where(active & ~less, mid, hi)
                at = run[np.minimum(lo, self.count - 1)]
                found[start : start + len(part)] = (
                    (lo < self.count) & (at[:, 0] == part[:, 0]) & (at[:, 1] == part[:, 1])
                )
        finally:
            del run  # unmapped: the pages it touched leave this process's memory
        return found


def _merged(a: _Run, b: _Run) -> Iterator[np.ndarray]:
    """The records of two runs of distinct keys, in sorted order, a chunk at a time."""
    pos = {id(a): 0, id(b): 0}

    def more(run: _Run) -> np.ndarray:
        start = pos[id(run)]
        pos[id(run)] = stop = min(start + _MERGE_READ, run.count)
        return run.read(start, stop)

    left, right = more(a), more(b)
    while len(left) and len(right):
        bound = min(tuple(left[-1].tolist()), tuple(right[-1].tolist()))  # tuples: key order
        take_l, take_r = _count_upto(left, bound), _count_upto(right, bound)
        yield _sorted(np.concatenate([left[:take_l], right[:take_r]]))
        left, right = left[take_l:], right[take_r:]
        if not len(left):
            left = more(a)
        if not len(right):
            right = more(b)
    for rest, run in ((left, a), (right, b)):
        while len(rest):
            yield rest
            rest = more(run)
