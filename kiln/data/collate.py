"""Collation: a list of examples -> a batch of padded int64 tensors.

Labels are not shifted here: the causal loss shifts them (position t predicts token t + 1), and
seq2seq models build decoder inputs from the labels.

Collators live in a registry, `COLLATORS`, chosen by name (`data.collator`; "auto" is the task's
default). A collator is called as `fn(examples, pad_id=..., pad_to_multiple_of=...)`; add one with
`@register_collator("name")`. `Batcher` turns dataset indices into a batch: packed causal blocks
take a fast path (one gather, no attention mask, position ids restarting per document), the rest
goes through the collator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from kiln.registry import Registry

__all__ = [
    "COLLATORS",
    "DEFAULT_COLLATORS",
    "IGNORE_INDEX",
    "Batcher",
    "Collator",
    "collate",
    "get_collator",
    "packed_batch",
    "pad_sequences",
    "register_collator",
]

IGNORE_INDEX = -100
"""Label value the cross-entropy loss skips (padding); transformers' default ignore_index."""

_TASKS = ("causal_lm", "instruction", "chat", "preference", "seq2seq")

Example = Mapping[str, Sequence[int] | Tensor]


class Collator(Protocol):
    """Batches examples into int64 tensors (see `collate` for the layout per task)."""

    def __call__(
        self, examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int | None = None
    ) -> dict[str, Tensor]: ...


COLLATORS: Registry[Collator] = Registry("collator", reserved=("auto",))
"""Collators by name; `data.collator` picks one ("auto": `DEFAULT_COLLATORS[task]`), or names
one by import path, "package.module:function"."""

DEFAULT_COLLATORS = {
    "causal_lm": "causal",
    "instruction": "instruction",
    "chat": "instruction",  # aligned labels, -100 off the assistant turns
    "preference": "preference",
    "seq2seq": "seq2seq",
}


def register_collator(name: str, *, replace: bool = False) -> Callable[[Collator], Collator]:
    """Decorator adding a collator to `COLLATORS` under `name` (which must be new, not "auto",
    unless `replace`)."""
    return COLLATORS.register(name, replace=replace)


def get_collator(name: str, task: str) -> Collator:
    """The collator registered as `name` (or imported from "module:attribute"), or the task's
    default for "auto".

    Raises:
        ValueError: an unknown task.
        UnknownName (a KeyError): an unknown name (the message lists the known names).
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {_TASKS}")
    return COLLATORS.get(DEFAULT_COLLATORS[task] if name == "auto" else name)


def _as_long(seq: Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(seq, dtype=torch.int64)


def pad_sequences(
    seqs: Sequence[Tensor], value: int, pad_to_multiple_of: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors to a common length.

    Args:
        seqs: int64 1-D tensors.
        value: the padding value.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor cores).

    Returns:
        (padded (B, T), mask (B, T)) with mask 1 on real tokens, 0 on padding.
    """
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max()) if len(seqs) else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    padded = torch.full((len(seqs), width), value, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)] = seq
    mask = (torch.arange(width) < lengths[:, None]).to(torch.int64)
    return padded, mask


def _check_batch(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty batch")


def _with_aligned_labels(
    examples: Sequence[Example], task: str, pad_id: int, pad_to_multiple_of: int | None
) -> dict[str, Tensor]:
    ids = [_as_long(e["input_ids"]) for e in examples]
    labels_list = [_as_long(e["labels"]) for e in examples]
    if task != "seq2seq" and any(len(a) != len(b) for a, b in zip(ids, labels_list, strict=True)):
        raise ValueError(f"task {task}: labels must have the length of their input_ids")
    input_ids, attention_mask = pad_sequences(ids, pad_id, pad_to_multiple_of)
    labels, _ = pad_sequences(labels_list, IGNORE_INDEX, pad_to_multiple_of)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@register_collator("causal")
def collate_causal(
    examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """causal_lm: right-padded input_ids, attention_mask, labels = input_ids with -100 on padding.

    Equal-length examples (packed blocks) are just stacked, with an all-ones attention_mask.
    Examples that all carry aligned `labels` keep them (as for instruction).
    """
    _check_batch(examples)
    if all("labels" in e for e in examples):
        return _with_aligned_labels(examples, "causal_lm", pad_id, pad_to_multiple_of)
    ids = [_as_long(e["input_ids"]) for e in examples]
    width = len(ids[0])
    if all(len(s) == width for s in ids) and (
        not pad_to_multiple_of or width % pad_to_multiple_of == 0
    ):
        input_ids = torch.stack(ids)  # (B, L): nothing to pad
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
        }
    input_ids, attention_mask = pad_sequences(ids, pad_id, pad_to_multiple_of)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@register_collator("instruction")
def collate_instruction(
    examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """instruction: like causal, but every example carries aligned labels (-100 on the prompt)."""
    _check_batch(examples)
    if not all("labels" in e for e in examples):
        raise ValueError(
            "task instruction: every example needs labels (input_ids with -100 on the prompt)"
        )
    return _with_aligned_labels(examples, "instruction", pad_id, pad_to_multiple_of)


@register_collator("seq2seq")
def collate_seq2seq(
    examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """seq2seq: input_ids padded with pad_id, attention_mask, labels padded with -100."""
    _check_batch(examples)
    return _with_aligned_labels(examples, "seq2seq", pad_id, pad_to_multiple_of)


def collate(
    examples: Sequence[Example],
    pad_id: int,
    task: str,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Batch examples (`{"input_ids"[, "labels"]}`) into padded int64 tensors (task default).

    causal_lm: `input_ids` right-padded with `pad_id`, `attention_mask`, and `labels` = input_ids
    with -100 on padding (unshifted). Equal-length examples (packed blocks) are just stacked, and
    their attention_mask is all ones. Examples that carry aligned `labels` keep them (as for
    instruction).
    instruction: like causal_lm, but every example must carry `labels` aligned with its
    input_ids (-100 on prompt tokens); they are right-padded with -100 (unshifted).
    seq2seq: `input_ids` padded with `pad_id`, `attention_mask`, and `labels` padded with -100.

    Padding is found from lengths, not by comparing with `pad_id`, so a real token that equals
    `pad_id` (often EOS) stays a target.

    Args:
        examples: the batch, as from `TokenDataset.__getitem__` (token ids as lists or tensors).
        pad_id: the tokenizer's pad token id.
        task: "causal_lm", "instruction" or "seq2seq".
        pad_to_multiple_of: round padded lengths up to a multiple of this.

    Returns:
        int64 tensors of shape (B, T) (labels (B, T_target) for seq2seq).

    Raises:
        ValueError: an unknown task, an empty batch, instruction examples without labels, or
            causal labels whose length differs from their input_ids.
    """
    fn = get_collator("auto", task)
    return fn(examples, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def packed_batch(dataset: Any, indices: Tensor) -> dict[str, Tensor]:
    """The packed causal blocks at `indices`: one gather, no padding, so no attention mask.

    With document boundaries (`dataset.doc_starts`), `position_ids` restart at 0 for each
    document, which transformers turns into a block-diagonal causal mask (no attention across
    documents), and each document's first token is not a target (label -100): it is not
    predicted from the previous document's EOS, as it would not be with the document alone.
    A batch in which no document starts inside a block gets no `position_ids` (they would be
    0 .. L - 1, the model's own): transformers then skips looking for packed documents, a
    few small ops and, on a GPU, a host sync per forward.
    """
    ids = dataset.blocks[indices]  # (B, L)
    if dataset.doc_starts is None:
        return {"input_ids": ids, "labels": ids}
    position_ids = dataset.block_position_ids(indices)  # (B, L)
    inside = position_ids == 0
    inside[:, 0] = False  # a block's first token is never a target anyway
    if not inside.any():
        return {"input_ids": ids, "labels": ids}
    labels = ids.masked_fill(inside, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


@register_collator("preference")
def collate_preference(
    examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """preference: B pairs as (2B, T), right-padded: the B chosen sequences, then the B
    rejected ones, with attention_mask and labels (-100 off the completions)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    sides = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    sides += [
        {"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples
    ]
    return _with_aligned_labels(sides, "preference", pad_id, pad_to_multiple_of)


class Batcher:
    """Turns sample indices of a dataset into a batch, as training and evaluation share it.

    Packed blocks of a causal_lm dataset take `packed_batch` (unless a non-default collator is
    named); everything else goes through the collator, with `pad_to_multiple_of`.

    Args:
        task: "causal_lm", "instruction" or "seq2seq".
        pad_id: the tokenizer's pad token id.
        collator: a `COLLATORS` name (or "module:attribute"), or "auto" for the task's default.
        pad_to_multiple_of: round padded lengths up to a multiple of this.

    Raises:
        ValueError: an unknown task.
        UnknownName (a KeyError): an unknown collator name.
    """

    def __init__(
        self,
        task: str,
        pad_id: int,
        *,
        collator: str = "auto",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        self.task, self.pad_id, self.pad_to_multiple_of = task, pad_id, pad_to_multiple_of
        self.collate_fn = get_collator(collator, task)
        self._packed = task == "causal_lm" and collator in ("auto", DEFAULT_COLLATORS[task])

    def __call__(self, dataset: Any, indices: Tensor) -> dict[str, Tensor]:
        """The batch of `dataset[indices]` (indices: a 1-D int64 tensor)."""
        if self._packed and getattr(dataset, "blocks", None) is not None:
            return packed_batch(dataset, indices)
        batch = getattr(dataset, "batch", None)  # builds its own (packed conversations)
        if batch is not None:
            return batch(indices)
        gather = getattr(dataset, "gather", None)  # one call for the batch (augmentation)
        examples = gather(indices) if gather else [dataset[i] for i in indices.tolist()]
        return self.collate_fn(
            examples, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of
        )
