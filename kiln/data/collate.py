"""Collation: a list of examples -> a batch of padded int64 tensors.

Labels are not shifted here: the causal loss shifts them (position t predicts token t + 1), and
seq2seq models build decoder inputs from the labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "collate", "pad_sequences"]

IGNORE_INDEX = -100
"""Label value the cross-entropy loss skips (padding); transformers' default ignore_index."""

_TASKS = ("causal_lm", "instruction", "seq2seq")


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


def collate(
    examples: Sequence[Mapping[str, Sequence[int] | Tensor]],
    pad_id: int,
    task: str,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Batch examples (`{"input_ids"[, "labels"]}`) into padded int64 tensors.

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
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {_TASKS}")
    if not examples:
        raise ValueError("cannot collate an empty batch")
    ids = [_as_long(e["input_ids"]) for e in examples]
    with_labels = all("labels" in e for e in examples)
    if task == "instruction" and not with_labels:
        raise ValueError(
            "task instruction: every example needs labels (input_ids with -100 on the prompt)"
        )
    if task == "seq2seq" or with_labels:
        labels_list = [_as_long(e["labels"]) for e in examples]
        if task != "seq2seq" and any(
            len(a) != len(b) for a, b in zip(ids, labels_list, strict=True)
        ):
            raise ValueError(f"task {task}: labels must have the length of their input_ids")
        input_ids, attention_mask = pad_sequences(ids, pad_id, pad_to_multiple_of)
        labels, _ = pad_sequences(labels_list, IGNORE_INDEX, pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

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
