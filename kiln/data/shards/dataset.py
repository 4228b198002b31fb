"""`ShardDataset`: training or validation examples read from a token shard set by memory map.

It stands where a `TokenDataset` stands (the loop, the batcher and evaluation see the same
interface: `len`, `ds[i]`, `blocks`, `doc_starts`, `block_position_ids`, `lengths`,
`num_tokens`), but holds no token in memory: a few int64 numbers per document (which documents,
where each starts in the packed stream), read from the shards' offset files when it is made.

The examples are the ones the in-memory path makes of the same rows, in the same order, so a
run trains on the same batches either way (tests/test_shard_train.py checks the losses match):

- packed causal_lm: the selected documents (ids + EOS) concatenated in order and cut into
  blocks of `block` tokens, the last partial block dropped (`tokenize_causal`); block i is
  tokens [i * block, (i + 1) * block) of that stream, gathered from the documents it spans.
- unpacked causal_lm: document i cut to `cut` tokens, `(ids + [eos])[:max_length]`.
- instruction: document i with its label mask as aligned labels (-100 off the response); the
  0-token documents a prepare writes for samples it dropped (no room for a response) are
  skipped, as the in-memory path drops them after the split.
- seq2seq: document i split where its label mask turns from 0 to 1: input_ids the source
  (the 0s), labels the target (the 1s), as `tokenize_seq2seq` made them (cut when prepared).
  The split points are found when the dataset is made (one pass over the selected documents'
  masks, 8 bytes a document), so `lengths` (the sources') and `num_tokens` (the targets') need
  no more reading.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kiln.data.collate import IGNORE_INDEX
from kiln.data.shards.reader import ShardSet
from kiln.errors import DataError

__all__ = ["PackedBlocks", "ShardDataset", "split_documents"]


def split_documents(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`kiln.data.prepare.split_indices` as int64 arrays: the same (train, val) indices, each
    ascending, without a Python int per document (a corpus may have millions)."""
    n_val = math.ceil(round(val_split * n, 9))  # round first, as split_indices does
    gen = torch.Generator().manual_seed(seed & ((1 << 64) - 1))
    perm = torch.randperm(n, generator=gen)
    val, train = perm[:n_val], perm[n_val:]
    return train.sort().values.numpy(), val.sort().values.numpy()


class PackedBlocks:
    """The (N, L) blocks of a packed `ShardDataset`, indexed like a tensor by a batch of block
    indices (`blocks[indices]` -> an (B, L) int64 tensor), read from the shards."""

    def __init__(self, dataset: ShardDataset, n_blocks: int, length: int) -> None:
        self._ds = dataset
        self.shape = torch.Size((n_blocks, length))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Tensor | int) -> Tensor:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        flat = rows.reshape(-1).tolist()
        out = np.empty((len(flat), self.shape[1]), dtype=np.int64)
        for r, i in enumerate(flat):
            self._ds._read_block(i, out[r])
        return torch.from_numpy(out).reshape(*rows.shape, self.shape[1])


class ShardDataset:
    """Examples of some documents of a shard set (see the module docstring).

    Use `ShardDataset.packed(...)` or `ShardDataset.ragged(...)`.
    """

    def __init__(self, shards: ShardSet, docs: np.ndarray, lengths: np.ndarray) -> None:
        self.shards = shards
        self.docs = docs
        """Global document index of each selected document, in order."""
        self._lengths = lengths
        """Token count of each selected document (as stored)."""
        self._blocks: PackedBlocks | None = None
        self._stream_starts: np.ndarray | None = None
        self._doc_starts: Tensor | None = None
        self._cut: int | None = None
        self._runs: tuple[np.ndarray, np.ndarray] | None = None
        """Packed: (stream start, global token start) of each run of documents that lie end
        to end in the set too (a block is read in one copy a run, mostly one or two)."""
        self._sources: np.ndarray | None = None
        """seq2seq: the source's token count in each selected document (the target follows)."""

    @classmethod
    def packed(
        cls,
        shards: ShardSet,
        docs: np.ndarray,
        all_lengths: np.ndarray,
        block: int,
        *,
        isolate_documents: bool = True,
        what: str = "data",
    ) -> ShardDataset:
        """The documents `docs` packed into blocks of `block` tokens (causal_lm).

        Raises:
            DataError: the documents do not fill one block.
        """
        ds = cls(shards, docs, all_lengths[docs])
        ends = np.cumsum(ds._lengths)
        total = int(ends[-1]) if ends.size else 0
        n_blocks = total // block
        if n_blocks == 0:
            raise DataError(
                f"{what}: {len(docs)} documents make {total} tokens, fewer than one block of "
                f"data.max_length={block}; lower data.max_length or add text"
            )
        ds._stream_starts = ends - ds._lengths
        ds._runs = _runs(docs, ds._stream_starts, all_lengths)
        ds._blocks = PackedBlocks(ds, n_blocks, block)
        if isolate_documents:
            starts = ds._stream_starts
            ds._doc_starts = torch.from_numpy(starts[starts < n_blocks * block])
        return ds

    @classmethod
    def ragged(
        cls,
        shards: ShardSet,
        docs: np.ndarray,
        all_lengths: np.ndarray,
        *,
        cut: int | None = None,
        truncation: bool = True,
        what: str = "data",
    ) -> ShardDataset:
        """One example per document of `docs` that has tokens, cut to `cut` tokens (None: as
        stored). With `truncation` off, a document over `cut` is an error.

        Raises:
            DataError: a document longer than `cut` with truncation off (naming how many).
        """
        lengths = all_lengths[docs]
        keep = lengths > 0
        docs, lengths = docs[keep], lengths[keep]
        if cut is not None:
            over = lengths > cut
            if not truncation and over.any():
                first = int(docs[over.argmax()])
                raise DataError(
                    f"{what}: {int(over.sum())} documents are longer than data.max_length={cut} "
                    f"tokens (with EOS), the first is document {first} of {shards.directory}; "
                    "set data.truncation: true to cut them"
                )
        ds = cls(shards, docs, lengths)
        ds._cut = cut
        return ds

    @classmethod
    def seq2seq(
        cls, shards: ShardSet, docs: np.ndarray, all_lengths: np.ndarray, *, what: str = "data"
    ) -> ShardDataset:
        """One example per document of `docs`: input_ids its source (mask 0), labels its
        target (mask 1), as prepared (cut to the limits then).

        Raises:
            DataError: the set has no masks, or a document's mask is not 0s then 1s (each
                part non-empty): not a seq2seq set, or an altered one.
        """
        if not shards.has_masks:
            raise DataError(
                f"{what}: the shard set {shards.directory} has no label masks, so no seq2seq "
                "targets; prepare it again with task: seq2seq"
            )
        ds = cls(shards, docs, all_lengths[docs])
        sources = _source_lengths(shards, docs, what)
        ds._sources = sources
        return ds

    # ---- the TokenDataset interface ----------------------------------------------------------

    @property
    def blocks(self) -> PackedBlocks | None:
        """The (N, L) blocks, indexable by a batch of indices (packed), else None."""
        return self._blocks

    @property
    def doc_starts(self) -> Tensor | None:
        """Offsets (D,) into the flattened blocks where packed documents begin, or None."""
        return self._doc_starts

    @property
    def source_rows(self) -> Tensor | None:
        return None  # rows are not kept (nothing that needs them combines with shards)

    @property
    def has_labels(self) -> bool:
        return self._blocks is None and self.shards.has_masks

    @property
    def aligned(self) -> bool:
        """Labels aligned with input_ids (instruction), not a separate target (seq2seq)."""
        return self.has_labels and self._sources is None

    def without_documents(self) -> ShardDataset:
        """The same blocks without document boundaries (documents attend across each other)."""
        if self._doc_starts is None:
            return self
        ds = ShardDataset(self.shards, self.docs, self._lengths)
        ds._stream_starts, ds._cut, ds._runs = self._stream_starts, self._cut, self._runs
        ds._sources = self._sources
        assert self._blocks is not None
        ds._blocks = PackedBlocks(ds, *self._blocks.shape)
        return ds

    def block_position_ids(self, indices: Tensor) -> Tensor:
        """Position ids (B, L) of the blocks at `indices`: 0 at each block and document start
        (as `TokenDataset.block_position_ids`)."""
        if self._blocks is None:
            raise ValueError("block_position_ids needs a blocks dataset (packed causal_lm)")
        length = self._blocks.shape[1]
        steps = torch.arange(length, dtype=torch.int64)
        if self._doc_starts is None:
            return steps.expand(len(indices), length).clone()
        base = indices.to(torch.int64)[:, None] * length
        flat = base + steps
        starts = self._doc_starts
        k = torch.searchsorted(starts, flat, right=True) - 1
        start = torch.where(k >= 0, starts[k.clamp(min=0)], 0).maximum(base)
        return flat - start

    @cached_property
    def lengths(self) -> Tensor:  # type: ignore[override]
        """Length of each example's input_ids, (N,) int64."""
        if self._blocks is not None:
            n, length = self._blocks.shape
            return torch.full((n,), length, dtype=torch.int64)
        if self._sources is not None:  # seq2seq: the input is the source
            return torch.from_numpy(self._sources)
        lengths = torch.from_numpy(self._lengths)
        return lengths if self._cut is None else lengths.clamp(max=self._cut)

    @cached_property
    def num_tokens(self) -> int:  # type: ignore[override]
        """Target tokens, counted as `TokenDataset.num_tokens` counts them (for instruction,
        one pass over the selected documents' masks, once)."""
        if self._blocks is not None:
            n, length = self._blocks.shape
            total = n * max(length - 1, 0)
            if self._doc_starts is not None:
                total -= int((self._doc_starts % length != 0).sum())
            return total
        if not self.has_labels:
            return int((self.lengths - 1).clamp(min=0).sum())
        return int(self.example_targets().sum())

    def example_targets(self) -> np.ndarray:
        """Target tokens of each example, (N,) int64, as `num_tokens` counts them (ragged
        examples with labels: instruction reads the masks, once a call; seq2seq has them)."""
        if self._sources is not None:  # seq2seq: every target token is one
            return self._lengths - self._sources
        out = np.empty(len(self), dtype=np.int64)
        for i, d in enumerate(self.docs.tolist()):
            mask = self.shards.mask(d)
            assert mask is not None
            out[i] = np.count_nonzero(mask[1:])  # the first position is never predicted
        return out

    def __len__(self) -> int:
        if self._blocks is not None:
            return self._blocks.shape[0]
        return int(self.docs.size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        index %= n
        if self._blocks is not None:
            return {"input_ids": self._blocks[index]}
        d = int(self.docs[index])
        if self._sources is not None:  # seq2seq: the source, then the target
            tokens = torch.from_numpy(self.shards.doc(d).astype(np.int64))
            split = int(self._sources[index])
            return {"input_ids": tokens[:split], "labels": tokens[split:]}
        ids = torch.from_numpy(self.shards.doc(d)[: self._cut].astype(np.int64))
        example = {"input_ids": ids}
        if self.has_labels:
            mask = self.shards.mask(d)
            assert mask is not None
            keep = torch.from_numpy(mask[: self._cut].astype(np.bool_))
            example["labels"] = ids.masked_fill(~keep, IGNORE_INDEX)
        return example

    def _read_block(self, index: int, out: np.ndarray) -> None:
        """Fill `out` (L,) with block `index`: stream tokens [index * L, (index + 1) * L)."""
        assert self._blocks is not None
        assert self._runs is not None
        n, length = self._blocks.shape
        if not 0 <= index < n:
            raise IndexError(f"block {index} out of range for {n} blocks")
        run_stream, run_global = self._runs
        lo, hi = index * length, (index + 1) * length
        r = int(np.searchsorted(run_stream, lo, side="right")) - 1  # the run holding `lo`
        pos = lo
        while pos < hi:
            end = int(run_stream[r + 1]) if r + 1 < run_stream.size else hi
            take = min(end, hi) - pos
            self.shards.read(
                int(run_global[r]) + pos - int(run_stream[r]), out[pos - lo : pos - lo + take]
            )
            pos += take
            r += 1

    def __repr__(self) -> str:
        layout = f"blocks of {self._blocks.shape[1]}" if self._blocks is not None else "ragged"
        labels = (", aligned labels" if self.aligned else ", labels") if self.has_labels else ""
        return f"ShardDataset({len(self)} examples, {layout}{labels}, from {self.shards.directory})"


def _source_lengths(shards: ShardSet, docs: np.ndarray, what: str) -> np.ndarray:
    """(len(docs),) int64: the source's token count in each of `docs` (seq2seq: the mask's
    leading 0s), checked to be followed by 1s only, both parts non-empty.

    Vectorized a shard at a time (two `reduceat` passes over the shard's mask): 0.1-0.2 s for
    200k documents of 14M tokens, where a Python loop over the documents took 3 s."""
    first = np.concatenate([[0], np.cumsum(shards.documents_per_shard)])
    shard_of = np.searchsorted(first, docs, side="right") - 1
    out = np.empty(docs.size, dtype=np.int64)
    for k in np.unique(shard_of).tolist():
        arrays = shards.shard_arrays(k)
        offsets, mask = np.asarray(arrays["offsets"]), arrays["mask"]
        begin, lengths = offsets[:-1], np.diff(offsets)
        targets = np.zeros(lengths.size, dtype=np.int64)
        full = lengths > 0  # reduceat sums [begin_i, begin_next): empty documents add nothing
        if full.any():
            targets[full] = np.add.reduceat(mask, begin[full], dtype=np.int64)
        sources = lengths - targets
        bad = (sources == 0) | (targets == 0)
        ok = np.flatnonzero(~bad)
        if ok.size:  # the source part holds no 1: then the target part is all 1s
            bounds = np.empty(2 * ok.size, dtype=np.int64)
            bounds[0::2], bounds[1::2] = begin[ok], begin[ok] + sources[ok]  # rising strictly
            bad[ok] = np.add.reduceat(mask, bounds, dtype=np.int64)[0::2] != 0
        where = np.flatnonzero(shard_of == k)
        local = docs[where] - first[k]
        if bad[local].any():
            d = int(docs[where[bad[local].argmax()]])
            raise DataError(
                f"{what}: document {d} of {shards.directory} is not a seq2seq pair (its label "
                "mask is not source 0s then target 1s); prepare the set again"
            )
        out[where] = sources[local]
    return out


def _runs(
    docs: np.ndarray, stream_starts: np.ndarray, all_lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(stream start, global token start) of each maximal run of selected documents that are
    consecutive in the set as well (so also end to end in the shards' tokens)."""
    global_starts = np.cumsum(all_lengths) - all_lengths
    first = np.flatnonzero(np.diff(docs, prepend=-2) != 1)  # a run begins where a gap is
    return stream_starts[first], global_starts[docs[first]]


def shard_examples(
    shards: ShardSet, docs: np.ndarray, all_lengths: np.ndarray, cfg: Any, *, what: str
) -> ShardDataset:
    """The examples the run's task and data settings make of documents `docs`."""
    data = cfg.data
    if cfg.task == "causal_lm" and data.packing:
        return ShardDataset.packed(
            shards,
            docs,
            all_lengths,
            data.max_length,
            isolate_documents=data.isolate_documents,
            what=what,
        )
    if cfg.task == "causal_lm":
        return ShardDataset.ragged(
            shards, docs, all_lengths, cut=data.max_length, truncation=data.truncation, what=what
        )
    if cfg.task == "seq2seq":  # data.packing does not apply, as in memory
        return ShardDataset.seq2seq(shards, docs, all_lengths, what=what)
    return ShardDataset.ragged(shards, docs, all_lengths, what=what)  # cut when prepared
