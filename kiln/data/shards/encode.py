"""Batches of rendered rows -> documents of token ids, in `data.num_workers` processes.

    maker = DocumentMaker(task, tokenizer, dtype, max_length, truncation)
    with EncodePool(maker, workers=2) as pool:
        for docs in pool.map(batches):      # in the order of `batches`
            for ids, mask in docs: ...

`kiln data prepare` streams, checks, filters and deduplicates rows in its main process, a batch
at a time, and hands each batch to a pool of worker processes that tokenize it (each with its
own tokenizer, so its own Rust tokenizer); the documents come back in the batches' order, so
the shard bytes do not depend on the number of workers. At most `2 x workers` batches are in
flight, so memory stays bounded whatever the corpus size. `workers=0` makes the documents in
the calling process (the same function: the same documents).

Workers are forked where the platform allows it (Linux): they start in milliseconds with the
tokenizer already loaded; a spawned worker would import torch and transformers first (seconds).
A worker of a pool with as many workers as cores tokenizes on one thread
(`TOKENIZERS_PARALLELISM=false`): the processes already fill the cores, and the Rust tokenizer's
thread pool on top of them only adds contention.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DocumentMaker", "Documents", "EncodePool", "cores"]

Rendered = list[tuple[tuple[str, ...], str]]
"""A batch of rows as `kiln data prepare` renders them: (template parts, `file:line`) each."""


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class Documents:
    """One batch's documents: document d is `tokens[offsets[d]:offsets[d + 1]]` (its label
    mask the same slice of `mask`, None: every token); `no_target`: samples dropped for want
    of a target token (instruction), each an empty document."""

    tokens: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None = None
    no_target: int = 0

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        bounds = self.offsets.tolist()
        for start, end in itertools.pairwise(bounds):
            mask = None if self.mask is None else self.mask[start:end]
            yield self.tokens[start:end], mask


@dataclass(frozen=True)
class DocumentMaker:
    """Turns a batch of rendered rows into its documents, one per row.

    causal_lm: ids + EOS, as `tokenize_causal` makes a document before packing. instruction:
    the sample `tokenize_instruction` makes (prompt + response + EOS, cut to `max_length`),
    with its label mask; a sample without a target token is an empty document. seq2seq: the
    pair `tokenize_seq2seq` makes, its input_ids (source, cut to `max_length`, + EOS) then its
    labels (target, cut to `max_target_length`, + EOS) as one document, the mask 0 on the
    source and 1 on the target (both have at least their EOS, so the split is never empty).

    Args:
        task: "causal_lm", "instruction" or "seq2seq".
        tokenizer: a transformers tokenizer with an eos token.
        dtype: the token dtype of the documents (the shard set's).
        max_length: instruction: tokens per sample at most; seq2seq: source tokens at most.
        truncation: instruction, seq2seq: cut a too-long sample (else a DataError naming it).
        max_target_length: seq2seq: target tokens at most.
    """

    task: str
    tokenizer: Any
    dtype: np.dtype
    max_length: int = 0
    truncation: bool = True
    max_target_length: int = 0

    def __call__(self, batch: Rendered) -> Documents:
        if self.task == "instruction":
            return self._instruction(batch)
        if self.task == "seq2seq":
            return self._seq2seq(batch)
        return self._causal(batch)

    def _causal(self, batch: Rendered) -> Documents:
        from kiln.data.tokenize import encode

        ids = list(encode([parts[0] for parts, _ in batch], self.tokenizer))
        offsets = _offsets(np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids)))
        tokens = np.empty(int(offsets[-1]), dtype=self.dtype)
        eos = self.tokenizer.eos_token_id
        for start, doc in zip(offsets[:-1].tolist(), ids, strict=True):
            end = start + len(doc)
            tokens[start:end] = doc
            tokens[end] = eos
        return Documents(tokens, offsets)

    def _instruction(self, batch: Rendered) -> Documents:
        from kiln.data.collate import IGNORE_INDEX
        from kiln.data.tokenize import tokenize_instruction
        from kiln.errors import DataError

        empty = Documents(np.zeros(0, self.dtype), np.zeros(len(batch) + 1, np.int64), None)
        empty.mask, empty.no_target = np.zeros(0, dtype=np.uint8), len(batch)
        if not batch:
            return empty
        try:
            samples = tokenize_instruction(
                [parts[0] for parts, _ in batch],
                [parts[1] for parts, _ in batch],
                self.tokenizer,
                self.max_length,
                self.truncation,
                locations=[where for _, where in batch],
                what="training data",
                quiet=True,
            )
        except DataError:
            if not self.truncation:  # too-long samples, refused: the user's error
                raise
            return empty  # with truncation: every sample dropped
        rows = samples.source_rows.tolist()  # the batch index of each kept sample
        lengths = np.zeros(len(batch), dtype=np.int64)
        ids, masks = [], []
        for i, row in enumerate(rows):
            sample = samples[i]
            ids.append(sample["input_ids"].numpy())
            masks.append((sample["labels"].numpy() != IGNORE_INDEX).astype(np.uint8))
            lengths[row] = ids[-1].size
        offsets = _offsets(lengths)
        tokens = np.concatenate(ids).astype(self.dtype)
        return Documents(tokens, offsets, np.concatenate(masks), len(batch) - len(rows))

    def _seq2seq(self, batch: Rendered) -> Documents:
        from kiln.data.tokenize import tokenize_seq2seq

        if not batch:
            return Documents(np.zeros(0, self.dtype), np.zeros(1, np.int64), np.zeros(0, np.uint8))
        samples = tokenize_seq2seq(
            [parts[0] for parts, _ in batch],
            [parts[1] for parts, _ in batch],
            self.tokenizer,
            self.max_length,
            self.max_target_length,
            truncation=self.truncation,
            locations=[where for _, where in batch],
        )
        examples = (samples[i] for i in range(len(samples)))  # one per row: none is dropped
        pairs = [(e["input_ids"].numpy(), e["labels"].numpy()) for e in examples]
        tokens = np.concatenate([part for pair in pairs for part in pair]).astype(self.dtype)
        mask = np.concatenate(
            [np.repeat(np.array([0, 1], np.uint8), [src.size, tgt.size]) for src, tgt in pairs]
        )
        lengths = np.fromiter((src.size + tgt.size for src, tgt in pairs), np.int64, len(pairs))
        return Documents(tokens, _offsets(lengths), mask)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(n + 1,) int64 offsets of documents of these lengths, from 0."""
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


_PARALLELISM = "TOKENIZERS_PARALLELISM"
_MAKER: DocumentMaker | None = None  # a worker's own, set once by `_start_worker`


def _start_worker(maker: DocumentMaker) -> None:
    global _MAKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch = sys.modules.get("torch")
    if torch is not None:  # as DataLoader workers do: no intra-op threads forked mid-use
        torch.set_num_threads(1)
    _MAKER = maker


def _make(batch: Rendered) -> Documents:
    assert _MAKER is not None, "a worker without its DocumentMaker"
    return _MAKER(batch)


@contextlib.contextmanager
def _parallelism(value: str | None) -> Iterator[None]:
    """`TOKENIZERS_PARALLELISM` set to `value` (None: as it is) while workers start: they
    inherit it (a forked worker also skips the Rust tokenizer's "forked after parallelism has
    already been used" warning when it is set)."""
    if value is None:
        yield
        return
    old = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[_PARALLELISM]
        else:
            os.environ[_PARALLELISM] = old


class EncodePool:
    """`workers` processes making documents of batches with `maker`, results in order.

    Use as a context manager: leaving it stops the workers (at once on an error).
    """

    def __init__(self, maker: DocumentMaker, workers: int) -> None:
        self.maker, self.workers = maker, max(0, workers)
        self._pool: Any = None

    def __enter__(self) -> EncodePool:
        if self.workers > 0:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with _parallelism(None if self.workers < cores() else "false"):
                self._pool = context.Pool(
                    self.workers, initializer=_start_worker, initargs=(self.maker,)
                )
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:
            self._pool.terminate()
        self._pool.join()
        self._pool = None

    def map(self, batches: Iterable[Rendered]) -> Iterator[Documents]:
        """Each batch's documents, in order; at most `2 x workers` batches in flight."""
        if self._pool is None:
            yield from map(self.maker, batches)
            return
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_make, (batch,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
