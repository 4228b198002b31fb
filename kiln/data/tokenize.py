"""Tokenization: batched fast-tokenizer calls into `TokenDataset`s.

Special tokens are added here, not by the tokenizer (`add_special_tokens=False`), so every
tokenizer gets the same layout: each causal document ends with EOS (the separator when packing),
and seq2seq inputs and labels end with EOS, as T5 was trained.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from kiln.data.dataset import TokenDataset, _as_tensor
from kiln.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["encode", "tokenize_causal", "tokenize_seq2seq"]

# Texts per tokenizer call: large enough for the Rust tokenizer's thread pool, small enough that
# the intermediate Python lists of one call stay a bounded share of memory.
_CHUNK = 4096


def encode(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Token ids of each text, without special tokens, from batched tokenizer calls."""
    for start in range(0, len(texts), _CHUNK):
        batch = list(texts[start : start + _CHUNK])
        # verbose=False: no "sequence longer than model_max_length" warning; we truncate later.
        out = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        yield from out["input_ids"]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            "the tokenizer has no eos_token; kiln ends every sequence with one (set eos_token)"
        )
    return int(eos)


def tokenize_causal(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    packing: bool,
    *,
    what: str = "data",
) -> TokenDataset:
    """Tokenize causal_lm documents, each followed by EOS.

    Args:
        texts: the documents.
        tokenizer: a (preferably fast) transformers tokenizer with an eos token.
        max_length: tokens per block (packing) or per document at most (no packing).
        packing: concatenate all documents and cut the stream into blocks of exactly
            `max_length` tokens, dropping the last partial block; otherwise truncate each
            document (with its EOS) to `max_length` tokens and keep variable lengths.
        what: names the data in error messages, e.g. "validation data".

    Returns:
        A blocks dataset (packing) or a ragged one.

    Raises:
        DataError: packing, and the text does not fill even one block.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = _eos_id(tokenizer)
    flat = array("q")
    if packing:
        for ids in encode(texts, tokenizer):
            flat.extend(ids)
            flat.append(eos)
        n_blocks = len(flat) // max_length
        if n_blocks == 0:
            raise DataError(
                f"{what}: {len(texts)} documents make {len(flat)} tokens, fewer than one block "
                f"of data.max_length={max_length}; lower data.max_length or add text"
            )
        # (T,) -> (N, max_length); the view shares the array's memory, no copy.
        return TokenDataset(_as_tensor(flat)[: n_blocks * max_length].view(n_blocks, max_length))
    offsets = array("q", [0])
    for ids in encode(texts, tokenizer):
        # Same as (ids + [eos])[:max_length]: a cut document gets no EOS, it did not end there.
        flat.extend(ids[:max_length])
        if len(ids) < max_length:
            flat.append(eos)
        offsets.append(len(flat))
    return TokenDataset.from_ragged((_as_tensor(flat), _as_tensor(offsets)))


def _ragged_with_eos(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, eos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's ids truncated to `max_length - 1`, then EOS, as (flat, offsets)."""
    flat = array("q")
    offsets = array("q", [0])
    for ids in encode(texts, tokenizer):
        flat.extend(ids[: max_length - 1])
        flat.append(eos)
        offsets.append(len(flat))
    return _as_tensor(flat), _as_tensor(offsets)


def tokenize_seq2seq(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_target_length: int,
) -> TokenDataset:
    """Tokenize seq2seq pairs: input_ids and labels, each truncated and ended with EOS.

    Args:
        sources: encoder inputs.
        targets: decoder targets, one per source.
        tokenizer: a transformers tokenizer with an eos token.
        max_length: input tokens at most (EOS included).
        max_target_length: label tokens at most (EOS included).

    Returns:
        A ragged dataset with labels.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    if min(max_length, max_target_length) < 1:
        raise ValueError("max_length and max_target_length must be >= 1")
    eos = _eos_id(tokenizer)
    ids = _ragged_with_eos(sources, tokenizer, max_length, eos)
    labels = _ragged_with_eos(targets, tokenizer, max_target_length, eos)
    return TokenDataset.from_ragged(ids, labels)
