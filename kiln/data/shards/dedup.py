"""`DigestSet`: the documents `kiln data prepare` has seen, as 16-byte digests, in compact memory.

`data.dedup` keeps the first of each rendered document. The streaming prepare remembers a
16-byte digest (blake2b) of every distinct document; a Python set of `bytes` costs ~100 bytes
a document (a 49-byte object plus the set's slot and spare room). `DigestSet` stores the same
digests as two uint64 in a numpy open-addressing table (linear probing), at most half full:
16 bytes a slot, so 32 to 64 bytes a distinct document (a doubling makes room: for that moment
the keys are copied out, 16 bytes each, beside the new table). 10M distinct documents: 320-640
MB instead of ~1 GB. Lookups and inserts run on whole batches (numpy), not a document at a time.

The digests are the ones the set of bytes held, and two documents are the same iff their
digests are, as before: the documents kept do not change. Two different documents share a
128-bit digest with probability about n^2 / 2^129 (n documents: 10^-20 for 10^9 of them).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DigestSet", "digest_keys"]

_CHUNK = 1 << 16  # keys placed together: the probing's temporaries stay a few MB
_EMPTY = np.uint64(0)  # a slot whose two words are 0 is free; the all-zero digest is kept apart


def digest_keys(digests: list[bytes]) -> np.ndarray:
    """(n, 2) uint64 keys of n 16-byte digests."""
    if any(len(d) != 16 for d in digests):
        raise ValueError("digests are 16 bytes each")
    return np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)


class DigestSet:
    """A set of 128-bit digests ((n, 2) uint64 keys), added a batch at a time.

    Args:
        capacity: the table's first size in slots (rounded up to a power of two).
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        size = 1 << max(4, (max(capacity, 1) - 1).bit_length())
        self._table = np.zeros((size, 2), dtype=np.uint64)
        self._count = 0
        self._has_zero = False  # the all-zero digest (it marks free slots in the table)

    def __len__(self) -> int:
        return self._count + self._has_zero

    @property
    def nbytes(self) -> int:
        """Bytes of the table (what grows with the distinct documents)."""
        return self._table.nbytes

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
        """Insert keys that are distinct, non-zero and not in the table."""
        if (self._count + len(keys)) * 2 > len(self._table):
            self._grow(self._count + len(keys))
        for start in range(0, len(keys), _CHUNK):  # bounds the probing's temporary arrays
            self._place(keys[start : start + _CHUNK])
        self._count += len(keys)

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
        old = self._table[(self._table[:, 0] != _EMPTY) | (self._table[:, 1] != _EMPTY)]
        del self._table
        self._table = np.zeros((size, 2), dtype=np.uint64)
        for start in range(0, len(old), _CHUNK):
            self._place(old[start : start + _CHUNK])
