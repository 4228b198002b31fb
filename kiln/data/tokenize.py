"""Tokenization: batched fast-tokenizer calls into `TokenDataset`s.

Special tokens are added here, not by the tokenizer (`add_special_tokens=False`), so every
tokenizer gets the same layout: each causal document ends with EOS (the separator when packing),
seq2seq inputs and labels end with EOS, as T5 was trained, and an instruction sample is
prompt + response + EOS.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from kiln.data.collate import IGNORE_INDEX
from kiln.data.dataset import TokenDataset, _as_tensor
from kiln.data.progress import Progress
from kiln.data.sources import _Problems
from kiln.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kiln.config import DataConfig

__all__ = [
    "encode",
    "encode_workers",
    "tokenize_causal",
    "tokenize_instruction",
    "tokenize_seq2seq",
    "tokenize_task",
]

log = logging.getLogger("kiln")

# Texts per tokenizer call: large enough for the Rust tokenizer's thread pool, small enough that
# the intermediate Python lists of one call stay a bounded share of memory. Long documents
# (data.max_chars allows 100,000 characters) end a call sooner: 4096 of those would make ~100M
# ids, gigabytes as Python lists.
_CHUNK = 4096
_CHUNK_CHARS = 4_000_000


def _batches(texts: Sequence[str]) -> Iterator[list[str]]:
    """Consecutive slices of `texts` of at most `_CHUNK` texts and, unless one text is longer
    by itself, `_CHUNK_CHARS` characters."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and end - start < _CHUNK:
            chars += len(texts[end])
            if chars > _CHUNK_CHARS and end > start:
                break
            end += 1
        yield list(texts[start:end])
        start = end


def encode(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, what: str | None = None
) -> Iterator[list[int]]:
    """Token ids of each text, without special tokens, from batched tokenizer calls.

    A fast tokenizer is called through its Rust backend (`encode_batch_fast`, which skips the
    character offsets) when that gives what `tokenizer(...)` gives: the same ids, without
    transformers building a `BatchEncoding` of per-text dicts: ~1.2x the throughput of the
    backend's `encode_batch` here, whose offsets `tokenizer(...)` also computes
    (benchmarks/data_throughput.py).

    Args:
        texts: the texts.
        tokenizer: a transformers tokenizer.
        what: names the texts in progress lines, e.g. "tokenizing training data"; a slow
            tokenization logs how far it got every few seconds (`kiln.data.progress`).
    """
    progress = Progress(what, len(texts), "texts") if what is not None else None
    done = 0
    for n, ids in _encode_batches(texts, tokenizer):
        yield from ids
        done += n
        if progress is not None:
            progress.update(done)
    if progress is not None:
        progress.done(f"{what}: {len(texts):,} texts")


def _encode_batches(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[int, Iterable[list[int]]]]:
    """(number of texts, their ids) per tokenizer call, in order."""
    backend = _plain_backend(tokenizer)
    workers = _WORKERS.get()
    if backend is None and workers > 0 and len(texts) > _CHUNK:
        for ids in _encode_in_processes(texts, tokenizer, workers):
            yield len(ids), ids
        return
    for batch in _batches(texts):
        if backend is not None:
            # Lazily: one text's Python list of ids at a time, as the caller takes them.
            encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
            yield len(batch), (e.ids for e in encodings)
            continue
        # verbose=False: no "sequence longer than model_max_length" warning; we truncate later.
        out = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        yield len(batch), out["input_ids"]


_WORKERS: ContextVar[int] = ContextVar("kiln_encode_workers", default=0)


@contextmanager
def encode_workers(num_workers: int) -> Iterator[None]:
    """Within the block, `encode` may use `num_workers` processes (`data.num_workers`).

    Only tokenizers without a plain Rust backend (see `encode`) use them: a fast tokenizer's
    `encode_batch` already runs on every core (Rayon threads), measured faster here than
    worker processes, which pay for pickling the ids back (and a Rayon pool forked from a
    process that used it can deadlock).
    """
    token = _WORKERS.set(num_workers)
    try:
        yield
    finally:
        _WORKERS.reset(token)


def _encode_chunk(args: tuple[PreTrainedTokenizerBase, list[str]]) -> list[list[int]]:
    tokenizer, texts = args
    with encode_workers(0):
        return list(encode(texts, tokenizer))


def _encode_in_processes(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, workers: int
) -> Iterator[list[list[int]]]:
    """`encode` over `workers` processes, each given one contiguous share of the texts; the
    ids of each share, in order."""
    import multiprocessing

    size = -(-len(texts) // workers)
    chunks = [(tokenizer, list(texts[i : i + size])) for i in range(0, len(texts), size)]
    with multiprocessing.get_context("spawn").Pool(len(chunks)) as pool:
        # imap keeps the order: the results match workers=0.
        yield from pool.imap(_encode_chunk, chunks)


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer behind `tokenizer` when calling it directly changes nothing, else None.

    That holds for a transformers fast tokenizer whose encoding path is not overridden, whose
    backend has no truncation or padding set (transformers would switch them off for the call)
    and whose `split_special_tokens` matches the backend's.
    """
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or any(
        getattr(cls, name) is not getattr(PreTrainedTokenizerFast, name)
        for name in ("__call__", "_encode_plus", "set_truncation_and_padding")
    ):
        return None
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend if hasattr(backend, "encode_batch_fast") else None


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
    isolate_documents: bool = True,
    truncation: bool = True,
    locations: Sequence[str] | None = None,
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
        isolate_documents: packing: record where each document starts (`doc_starts`), so
            batches restart position ids per document and documents do not attend across.
        truncation: no packing: False makes a document longer than `max_length` (with its
            EOS) an error instead of cutting it.
        locations: `file:line` of each text, for error messages.

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
        starts = array("q")
        for ids in encode(texts, tokenizer, what=f"tokenizing {what}"):
            starts.append(len(flat))
            flat.extend(ids)
            flat.append(eos)
        n_blocks = len(flat) // max_length
        if n_blocks == 0:
            raise DataError(
                f"{what}: {len(texts)} documents make {len(flat)} tokens, fewer than one block "
                f"of data.max_length={max_length}; lower data.max_length or add text"
            )
        # (T,) -> (N, max_length); the view shares the array's memory, no copy.
        blocks = _as_tensor(flat)[: n_blocks * max_length].view(n_blocks, max_length)
        if not isolate_documents:
            return TokenDataset(blocks)
        doc_starts = _as_tensor(starts)
        return TokenDataset(blocks, doc_starts=doc_starts[doc_starts < blocks.numel()])
    offsets = array("q", [0])
    too_long = _LongSequences("data.max_length", max_length, truncation, locations, what)
    for i, ids in enumerate(encode(texts, tokenizer, what=f"tokenizing {what}")):
        too_long.check(i, len(ids) + 1)
        # Same as (ids + [eos])[:max_length]: a cut document gets no EOS, it did not end there.
        flat.extend(ids[:max_length])
        if len(ids) < max_length:
            flat.append(eos)
        offsets.append(len(flat))
    too_long.raise_if_any()
    return TokenDataset.from_ragged((_as_tensor(flat), _as_tensor(offsets)))


class _LongSequences:
    """Collects sequences over a limit when truncation is off, to report them in one error."""

    def __init__(
        self,
        key: str,
        limit: int,
        truncation: bool,
        locations: Sequence[str] | None,
        what: str,
    ) -> None:
        self.key, self.limit, self.truncation = key, limit, truncation
        self.locations, self.what = locations, what
        self.found: list[str] = []

    def check(self, index: int, length: int) -> None:
        if self.truncation or length <= self.limit:
            return
        where = self.locations[index] if self.locations is not None else f"{self.what} #{index}"
        self.found.append(f"{where}: {length} tokens (EOS included) exceed {self.key}={self.limit}")

    def raise_if_any(self) -> None:
        if not self.found:
            return
        more = [f"... and {len(self.found) - 5} more"] if len(self.found) > 5 else []
        hint = f"raise {self.key} or set data.truncation: true"
        raise DataError([*self.found[:5], *more, hint])


def _ragged_with_eos(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    eos: int,
    too_long: _LongSequences | None = None,
    what: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's ids truncated to `max_length - 1`, then EOS, as (flat, offsets)."""
    flat = array("q")
    offsets = array("q", [0])
    for i, ids in enumerate(encode(texts, tokenizer, what=what)):
        if too_long is not None:
            too_long.check(i, len(ids) + 1)
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
    *,
    truncation: bool = True,
    locations: Sequence[str] | None = None,
) -> TokenDataset:
    """Tokenize seq2seq pairs: input_ids and labels, each truncated and ended with EOS.

    Args:
        sources: encoder inputs.
        targets: decoder targets, one per source.
        tokenizer: a transformers tokenizer with an eos token.
        max_length: input tokens at most (EOS included).
        max_target_length: label tokens at most (EOS included).
        truncation: False makes a longer source or target an error instead of cutting it.
        locations: `file:line` of each pair, for error messages.

    Returns:
        A ragged dataset with labels.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    if min(max_length, max_target_length) < 1:
        raise ValueError("max_length and max_target_length must be >= 1")
    eos = _eos_id(tokenizer)
    long_src = _LongSequences("data.max_length", max_length, truncation, locations, "source")
    long_tgt = _LongSequences(
        "data.max_target_length", max_target_length, truncation, locations, "target"
    )
    ids = _ragged_with_eos(sources, tokenizer, max_length, eos, long_src, "tokenizing sources")
    labels = _ragged_with_eos(
        targets, tokenizer, max_target_length, eos, long_tgt, "tokenizing targets"
    )
    long_src.found += long_tgt.found
    long_src.key = "data.max_length" if not long_tgt.found else "the limits"
    long_src.raise_if_any()
    return TokenDataset.from_ragged(ids, labels)


def tokenize_instruction(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: bool = True,
    *,
    locations: Sequence[str] | None = None,
    what: str = "data",
    quiet: bool = False,
) -> TokenDataset:
    """Tokenize instruction samples: the loss is on the response and its EOS only.

    input_ids = prompt_ids + response_ids + [eos]; labels (aligned with input_ids, unshifted)
    = [-100] * len(prompt_ids) + response_ids + [eos]. After the causal shift, the position of
    the last prompt token predicts the first response token, and the last response token
    predicts EOS, so the model learns where to stop.

    Prompt and response are tokenized separately (two batched calls), then concatenated: at
    inference the prompt is tokenized alone and the model continues from its last token, so
    training sees exactly the token boundary it will see then. Tokenizing the joined text
    instead could let BPE merge across the boundary (e.g. ":" + " The" -> ": The"), putting a
    prompt character in a target token and giving the model a boundary it never gets at
    inference. Put separating whitespace in the templates where you want it.

    Longer than `max_length` tokens (EOS included):

    - `truncation=True`: the whole prompt is kept and the response is cut from its end to fit;
      a cut response gets no EOS (it did not end there, and the model should not learn to
      stop mid-answer). A sample whose prompt alone leaves no room for a response token (no
      target token after the shift) is dropped, never trained on a cut prompt: a response
      whose prompt lost its beginning (often the instruction itself) teaches the model to
      answer questions it was not asked. Drops are logged; the caller counts them as
      `len(prompts) - len(dataset)`.
    - `truncation=False`: every too-long sample is a DataError, named by its location.

    Args:
        prompts: rendered prompts (no loss on their tokens).
        responses: rendered responses, one per prompt.
        tokenizer: a (preferably fast) transformers tokenizer with an eos token.
        max_length: tokens per sample at most (prompt + response + EOS).
        truncation: cut too-long samples (see above), or refuse them.
        locations: each sample's `file:line` for messages; default `sample <i>`.
        what: names the data in messages, e.g. "training data (train.jsonl)".
        quiet: do not warn about dropped samples (the caller handles them).

    Returns:
        A ragged dataset with aligned labels (`TokenDataset.aligned`), in input order, without
        the dropped samples (`source_rows` maps examples to their prompts).

    Raises:
        DataError: too-long samples with `truncation=False`, or every sample dropped.
    """
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"{n} prompts but {len(responses)} responses")
    if locations is not None and len(locations) != n:
        raise ValueError(f"{n} prompts but {len(locations)} locations")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = _eos_id(tokenizer)
    mask = array("q", [IGNORE_INDEX]) * max_length  # sliced for the prompt part of the labels
    ids, labels = array("q"), array("q")
    offsets = array("q", [0])
    too_long = _Problems()
    dropped: list[int] = []

    def name(i: int) -> str:
        return locations[i] if locations is not None else f"sample {i}"

    # Progress follows the prompts: the responses are tokenized in step with them.
    prompt_ids = encode(prompts, tokenizer, what=f"tokenizing {what}")
    pairs = zip(prompt_ids, encode(responses, tokenizer), strict=True)
    for i, (prompt, response) in enumerate(pairs):
        length = len(prompt) + len(response) + 1
        end = [eos]
        if length > max_length:
            if not truncation:
                too_long.add(
                    f"{name(i)}: {length} tokens (prompt {len(prompt)} + response "
                    f"{len(response)} + EOS) exceed data.max_length={max_length}; raise "
                    "data.max_length or set data.truncation: true"
                )
                continue
            response, end = response[: max(max_length - len(prompt), 0)], []
        # Targets after the shift: every label but the one at position 0.
        if len(response) + len(end) - (len(prompt) == 0) <= 0:
            dropped.append(i)
            continue
        ids.extend(prompt)
        ids.extend(response)
        ids.extend(end)
        labels.extend(mask[: len(prompt)])
        labels.extend(response)
        labels.extend(end)
        offsets.append(len(ids))
    too_long.raise_if_any()
    report_dropped(what, n, [name(i) for i in dropped], max_length, quiet)
    source_rows = None
    if dropped:
        keep = torch.ones(n, dtype=torch.bool)
        keep[dropped] = False
        source_rows = keep.nonzero().squeeze(1)
    return TokenDataset.from_aligned(ids, labels, offsets, source_rows=source_rows)


def report_dropped(
    what: str,
    n: int,
    dropped: Sequence[str],
    max_length: int,
    quiet: bool = False,
    *,
    items: str = "samples",
    target: str = "response",
) -> None:
    """Say that `dropped` (their locations; the first is named) of `n` `items` left no room
    for a `target` token after their prompt within `max_length`: a warning (debug when
    `quiet`), or a DataError when none is left.

    Raises:
        DataError: every one was dropped.
    """
    if not dropped:
        return
    if len(dropped) == n:
        raise DataError(
            f"{what}: all {n} {items} dropped: no {target} token fits after the prompt "
            f"within data.max_length={max_length}; raise data.max_length or shorten the "
            f"prompts (first: {dropped[0]})"
        )
    (log.debug if quiet else log.warning)(
        "%s: dropped %d of %d %s whose prompt leaves no room for a %s token within "
        "data.max_length=%d (first: %s)",
        what,
        len(dropped),
        n,
        items,
        target,
        max_length,
        dropped[0],
    )


def tokenize_task(
    task: str,
    rendered: Sequence[tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    *,
    truncation: bool | None = None,
    what: str = "data",
    locations: Sequence[str] | None = None,
    quiet: bool = False,
) -> TokenDataset:
    """Tokenize rendered rows for `task` as `data` configures it: the one task dispatch that
    data preparation and augmentation share, so a row gives the same tokens either way.

    causal_lm: `tokenize_causal` of each `(text,)` (`data.packing`, `data.isolate_documents`);
    seq2seq: `tokenize_seq2seq` of each `(source, target)` (`data.max_target_length`);
    instruction: `tokenize_instruction` of each `(prompt, response)`; chat: `tokenize_chat` of
    each `(conversation,)` (`data.chat_loss`); all within `data.max_length`.

    Args:
        task: "causal_lm", "instruction" or "seq2seq".
        rendered: one tuple per row, as `TaskFormat.render` gives it.
        tokenizer: a transformers tokenizer with an eos token.
        data: the run's data config.
        truncation: cut or refuse what is too long; default `data.truncation`.
        what: names the data in messages, e.g. "training data (train.jsonl)".
        locations: each row's `file:line`, for messages.
        quiet: instruction: log dropped samples at debug level, not as a warning.

    Raises:
        DataError: as the task's tokenize function raises it.
    """
    cut = data.truncation if truncation is None else truncation
    first = [r[0] for r in rendered]
    if task == "causal_lm":
        return tokenize_causal(
            first,
            tokenizer,
            data.max_length,
            data.packing,
            what=what,
            isolate_documents=data.isolate_documents,
            truncation=cut,
            locations=locations,
        )
    if task == "preference":
        from kiln.data.preference import tokenize_preference

        return tokenize_preference(
            rendered, tokenizer, data.max_length, cut, locations=locations, what=what, quiet=quiet
        )
    second = [r[1] for r in rendered] if task != "chat" else []
    if task == "seq2seq":
        return tokenize_seq2seq(
            first,
            second,
            tokenizer,
            data.max_length,
            data.max_target_length,
            truncation=cut,
            locations=locations,
        )
    if task == "instruction":
        return tokenize_instruction(
            first,
            second,
            tokenizer,
            data.max_length,
            cut,
            locations=locations,
            what=what,
            quiet=quiet,
        )
    if task == "chat":
        from kiln.data.chat import tokenize_chat

        return tokenize_chat(
            first,
            tokenizer,
            data.max_length,
            data.chat_loss,
            cut,
            locations=locations,
            what=what,
            quiet=quiet,
        )
    raise ValueError(f"unknown task {task!r}")
