"""TokenDataset: tokenized examples held in a few flat int64 tensors.

Two layouts:

- blocks: one (N, L) tensor of equal-length sequences (packed causal_lm). A batch is one gather,
  `dataset.blocks[indices]`, and collation is a stack. Packed blocks may carry `doc_starts`, the
  token offsets (into the row-major flattened blocks) where documents begin, so a batch can
  restart position ids at each document (`block_position_ids`) and keep documents isolated.
- ragged: all sequences concatenated into one 1-D tensor plus an offsets tensor (N + 1,). Compact
  (no Python list per example), cheap to pickle to DataLoader workers, and easy to cache.

An example is `{"input_ids": Tensor}`, plus `"labels"` when the dataset has labels: seq2seq
targets (a separate sequence), or, for causal tasks like instruction, labels *aligned* with
input_ids position by position, -100 (`IGNORE_INDEX`) where no loss is taken (prompt tokens).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kiln.data.collate import IGNORE_INDEX

__all__ = ["TokenDataset"]


def _flatten(seqs: Iterable[Iterable[int]]) -> tuple[Tensor, Tensor]:
    """Concatenate sequences into (flat (T,), offsets (N + 1,)) int64 tensors."""
    flat = array("q")
    offsets = array("q", [0])
    for seq in seqs:
        # extend copies a list of ints in one C loop; a tensor would iterate as 0-d tensors.
        flat.extend(seq.tolist() if isinstance(seq, Tensor) else seq)
        offsets.append(len(flat))
    return _as_tensor(flat), _as_tensor(offsets)


def _as_tensor(buf: array) -> Tensor:
    # frombuffer shares the array's memory (and keeps it alive); it refuses empty buffers.
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(buf, dtype=torch.int64)


class TokenDataset(Dataset[dict[str, Tensor]]):
    """Tokenized examples, indexable like a list of `{"input_ids", ["labels"]}` dicts.

    Build one from your own token ids, e.g. `TokenDataset([[5, 6, 7], [8, 9]])`, or
    `TokenDataset(src_ids, labels=tgt_ids)` for seq2seq, or
    `TokenDataset(ids, labels=[[-100, -100, 7], [-100, 9]], aligned=True)` for a causal LM with
    loss on some tokens only (instruction), or `TokenDataset(blocks)` from an (N, L) integer
    tensor (with `doc_starts=` offsets where packed documents begin).

    Args:
        input_ids: a list of token-id lists, or an (N, L) integer tensor of equal-length blocks.
        labels: per-example label ids (not with a blocks tensor): seq2seq targets, or aligned
            causal labels with -100 on tokens that carry no loss.
        aligned: `labels` align with `input_ids` (same lengths; a causal LM, which shifts them:
            the first label of an example is never predicted). False: a separate target
            sequence (seq2seq).
        doc_starts: with a blocks tensor only: the increasing offsets into the flattened
            (N * L,) blocks at which documents begin (packed causal_lm). A document's first
            token, when it is not the first of its block, is then not a target (`num_tokens`),
            as it would not be with the document alone in its own sequence.
    """

    def __init__(
        self,
        input_ids: Tensor | Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]] | None = None,
        *,
        aligned: bool = False,
        doc_starts: Tensor | Sequence[int] | None = None,
    ) -> None:
        self._blocks: Tensor | None = None
        self._doc_starts: Tensor | None = None
        self._ids: tuple[Tensor, Tensor] | None = None
        self._labels: tuple[Tensor, Tensor] | None = None
        self._aligned = aligned and labels is not None
        self._source_rows: Tensor | None = None
        if isinstance(input_ids, Tensor):
            if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
                raise ValueError(
                    f"a tensor of input_ids must be an (N, L) integer tensor, "
                    f"got shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}"
                )
            if labels is not None:
                raise ValueError("labels are not supported with a blocks tensor (causal_lm)")
            self._blocks = input_ids.to(torch.int64).contiguous()
            if doc_starts is not None:
                self._doc_starts = _check_doc_starts(doc_starts, self._blocks.numel())
        else:
            if doc_starts is not None:
                raise ValueError("doc_starts needs a blocks tensor (packed causal_lm)")
            self._ids = _flatten(input_ids)
            if labels is not None:
                self._labels = _flatten(labels)
                if len(self._labels[1]) != len(self._ids[1]):
                    raise ValueError(
                        f"labels has {len(self._labels[1]) - 1} sequences, "
                        f"input_ids has {len(self._ids[1]) - 1}"
                    )
        self._check_ids()

    @classmethod
    def from_aligned(
        cls, ids: array, labels: array, offsets: array, *, source_rows: Tensor | None = None
    ) -> TokenDataset:
        """Wrap int64 arrays as a tokenizer builds them: every example's ids, then its labels
        of the same length, both cut at `offsets` (0, ..., len(ids)); no copy (`from_ragged`)."""
        cuts = _as_tensor(offsets)
        return cls.from_ragged(
            (_as_tensor(ids), cuts),
            (_as_tensor(labels), cuts),
            aligned=True,
            source_rows=source_rows,
        )

    @classmethod
    def from_ragged(
        cls,
        ids: tuple[Tensor, Tensor],
        labels: tuple[Tensor, Tensor] | None = None,
        *,
        aligned: bool = False,
        source_rows: Tensor | None = None,
    ) -> TokenDataset:
        """Wrap (flat (T,), offsets (N + 1,)) int64 tensors without copying.

        Example i is `flat[offsets[i] : offsets[i + 1]]`; `offsets` starts at 0 and ends at T.
        `aligned` labels may share the offsets tensor of `ids` (see the class docstring).
        `source_rows`: (N,) index of the input row each example came from, when the tokenizer
        dropped some rows (default: example i is row i).
        """
        for name, pair in (("input_ids", ids), ("labels", labels)):
            if pair is None:
                continue
            flat, offsets = pair
            if flat.dim() != 1 or offsets.dim() != 1 or len(offsets) == 0:
                raise ValueError(f"{name}: expected a 1-D flat tensor and 1-D offsets")
            if int(offsets[0]) != 0 or int(offsets[-1]) != len(flat) or (offsets.diff() < 0).any():
                raise ValueError(f"{name}: offsets must rise from 0 to len(flat)")
        if labels is not None and len(labels[1]) != len(ids[1]):
            raise ValueError("input_ids and labels have different numbers of sequences")
        ds = cls.__new__(cls)
        ds._blocks = None
        ds._doc_starts = None
        ds._aligned = aligned and labels is not None
        ds._source_rows = None
        if source_rows is not None:
            ds._source_rows = torch.as_tensor(source_rows, dtype=torch.int64)
            if ds._source_rows.shape != (len(ids[1]) - 1,):
                raise ValueError("source_rows must hold one row index per example")
        ds._ids = (ids[0].to(torch.int64), ids[1].to(torch.int64))
        ds._labels = (
            None if labels is None else (labels[0].to(torch.int64), labels[1].to(torch.int64))
        )
        ds._check_ids()
        return ds

    def _check_ids(self) -> None:
        for flat in (self._blocks, self._ids and self._ids[0]):
            if flat is not None and flat.numel() and int(flat.min()) < 0:
                raise ValueError("token ids must be >= 0")
        if self._labels is not None:
            flat = self._labels[0]
            if flat.numel() and bool(((flat < 0) & (flat != IGNORE_INDEX)).any()):
                raise ValueError(f"labels must be token ids >= 0 or {IGNORE_INDEX}")
        if self._aligned:
            assert self._ids is not None
            assert self._labels is not None
            if not torch.equal(self._ids[1], self._labels[1]):
                raise ValueError("aligned labels must have the lengths of their input_ids")

    @property
    def blocks(self) -> Tensor | None:
        """The (N, L) int64 tensor when every example has the same length, else None."""
        return self._blocks

    @property
    def source_rows(self) -> Tensor | None:
        """(N,) index of the input row of each example (ragged), None for packed blocks.

        Example i comes from row i unless tokenization dropped rows (instruction samples
        without room for a response), which this maps around.
        """
        if self._blocks is not None:
            return None
        if self._source_rows is None:
            return torch.arange(len(self), dtype=torch.int64)
        return self._source_rows

    @property
    def doc_starts(self) -> Tensor | None:
        """Offsets (D,) into the flattened blocks where packed documents begin, or None."""
        return self._doc_starts

    def without_documents(self) -> TokenDataset:
        """The same blocks without document boundaries (documents attend across each other)."""
        if self._doc_starts is None:
            return self
        assert self._blocks is not None
        return TokenDataset(self._blocks)

    def block_position_ids(self, indices: Tensor) -> Tensor:
        """Position ids (B, L) of the blocks at `indices`: 0 at each block and document start.

        Vectorized over the batch (one searchsorted) on the CPU tensors the batch is built
        from, so it costs no device sync. Without `doc_starts`, every row is 0 .. L - 1.
        """
        if self._blocks is None:
            raise ValueError("block_position_ids needs a blocks dataset (packed causal_lm)")
        length = self._blocks.shape[1]
        steps = torch.arange(length, dtype=torch.int64)
        if self._doc_starts is None:
            return steps.expand(len(indices), length).clone()
        base = indices.to(torch.int64)[:, None] * length  # (B, 1) offset of each block
        flat = base + steps  # (B, L) offset of each token
        starts = self._doc_starts
        k = torch.searchsorted(starts, flat, right=True) - 1  # last document start <= token
        start = torch.where(k >= 0, starts[k.clamp(min=0)], 0).maximum(base)
        return flat - start

    @property
    def has_labels(self) -> bool:
        """Whether examples carry `labels` (seq2seq targets, or aligned causal labels)."""
        return self._labels is not None

    @property
    def aligned(self) -> bool:
        """Whether `labels` align with input_ids (causal: instruction), not a separate target."""
        return self._aligned

    @property
    def lengths(self) -> Tensor:
        """Length of each example's input_ids, (N,) int64."""
        if self._blocks is not None:
            n, length = self._blocks.shape
            return torch.full((n,), length, dtype=torch.int64)
        assert self._ids is not None
        return self._ids[1].diff()

    @property
    def num_tokens(self) -> int:
        """Target tokens: the tokens the loss is computed on.

        causal_lm: every token but the first of each example (each predicts the next one), and,
        in blocks with `doc_starts`, but the first of each document (isolated documents);
        aligned labels (instruction): the labels != -100 after the causal shift, i.e. not
        counting each example's first position; seq2seq: every label token != -100. The same
        count as `kiln.engine.loss.count_targets` over the collated batches.
        """
        if self._labels is not None:
            flat, offsets = self._labels
            is_target = flat != IGNORE_INDEX
            total = int(is_target.sum())
            if self._aligned:
                starts = offsets[:-1][offsets.diff() > 0]  # first position of non-empty examples
                total -= int(is_target[starts].sum())
            return total
        if self._blocks is not None:
            n, length = self._blocks.shape
            total = n * max(length - 1, 0)
            if self._doc_starts is not None:  # an isolated document's first token: no target
                total -= int((self._doc_starts % length != 0).sum())
            return total
        return int((self.lengths - 1).clamp(min=0).sum())

    def __len__(self) -> int:
        if self._blocks is not None:
            return self._blocks.shape[0]
        assert self._ids is not None
        return len(self._ids[1]) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        index %= n
        if self._blocks is not None:
            return {"input_ids": self._blocks[index]}
        assert self._ids is not None
        example = {"input_ids": _slice(self._ids, index)}
        if self._labels is not None:
            example["labels"] = _slice(self._labels, index)
        return example

    def __repr__(self) -> str:
        layout = f"blocks of {self._blocks.shape[1]}" if self._blocks is not None else "ragged"
        labels = (", aligned labels" if self._aligned else ", labels") if self.has_labels else ""
        return f"TokenDataset({len(self)} examples, {layout}{labels}, {self.num_tokens} tokens)"


def _check_doc_starts(doc_starts: Tensor | Sequence[int], size: int) -> Tensor:
    starts = torch.as_tensor(doc_starts, dtype=torch.int64).contiguous()
    if starts.dim() != 1:
        raise ValueError("doc_starts must be a 1-D sequence of offsets")
    if starts.numel() and (
        int(starts[0]) < 0 or int(starts[-1]) >= size or bool((starts.diff() <= 0).any())
    ):
        raise ValueError(f"doc_starts must rise strictly within [0, {size})")
    return starts


def _slice(ragged: tuple[Tensor, Tensor], index: int) -> Tensor:
    flat, offsets = ragged
    return flat[int(offsets[index]) : int(offsets[index + 1])]
