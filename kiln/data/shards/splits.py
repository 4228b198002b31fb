"""The run's training and validation examples from its token shard set (`data.storage: shards`).

    prepare the set if it is missing (`prepare_shards`; the main rank first, the others then
    find it) -> open it (one stat per file) -> split its documents as the in-memory path splits
    rows (`split_documents`) -> `data.max_samples` -> (`data.curriculum`: the documents'
    values, `values.py`; packed: the documents sorted by them, as `order_rows` sorts rows)
    -> `shard_examples`

Validation comes from `data.val` (read and tokenized in memory, as always: it is small, and
generation metrics need its rows) or from the held-out `data.val_split` of the documents.

With `data.sources` (a weighted mixture), each source's set goes through the same steps on its
own (`source_config`: the config with `data.train` set to the source's path); the training
examples are mixed by weight and the held-out ones concatenated (`kiln.data.shards.mixture`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.data.shards.values import reads_rows
from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.data.shards.dataset import ShardDataset
    from kiln.data.shards.reader import ShardSet
    from kiln.rank import RankContext

__all__ = ["ShardData", "shard_data"]

log = logging.getLogger("kiln")


@dataclass
class ShardData:
    """What `shard_data` gives the run."""

    tokenizer: Any
    train: ShardDataset
    val: Any
    """A ShardDataset (held-out documents), a TokenDataset (data.val), or None."""
    val_rows: list[Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    train_values: dict[str, Any] | None = None
    """`data.curriculum`: its values (`difficulty`, `quality`) of each training example, or
    of each document of the packed stream, in order (float64 tensors)."""


def _prepare(cfg: RunConfig, rank: RankContext | None) -> Any:
    """The prepared set (prepared now if missing): by the main rank first, so the ranks do
    not all write it; its error, if any, stops every rank with the same line."""
    from kiln.data.shards.prepare import prepare_shards

    if rank is None or not rank.distributed:
        return prepare_shards(cfg, shard_tokens=cfg.data.shard_tokens)
    error: str | None = None
    if rank.is_main:
        try:
            prepare_shards(cfg, shard_tokens=cfg.data.shard_tokens)
        except KilnError as exc:  # DataError is one
            error = str(exc)
    error = rank.broadcast(error, "preparing the token shards")
    if error is not None:
        raise DataError(error)
    return prepare_shards(cfg, shard_tokens=cfg.data.shard_tokens)  # found: nothing to do


def shard_data(cfg: RunConfig, rank: RankContext | None = None) -> ShardData:
    """The tokenizer, train and validation examples, and data_stats, from the shard set (or,
    with `data.sources`, from each source's set, as a `Mixture`).

    Raises:
        KilnError / DataError: one line: an unsupported option, a source or shard problem
            (missing, truncated, another tokenizer's set), too few documents.
    """
    from kiln.data.prepare import load_eval_data

    if cfg.data.sources is not None:
        return _mixture_data(cfg, rank)
    tokenizer, got = _split(cfg, rank, None, what=f"training data ({cfg.data.train})")
    val, val_rows, stats = got.val, None, got.stats
    if cfg.data.val is not None:
        val_rows, val, val_stats = load_eval_data(cfg, tokenizer, cfg.data.val)
        stats["val_rows"], stats["val_examples"] = len(val_rows), len(val)
        stats["val_tokens"] = val_stats.val_tokens
    log.info("training from %s: %d examples", got.shards, len(got.train))
    return ShardData(tokenizer, got.train, val, val_rows, stats, got.values)


@dataclass
class _Split:
    """One shard set's training and held-out examples and its stats."""

    shards: ShardSet
    train: ShardDataset
    val: ShardDataset | None
    stats: dict[str, Any]
    values: dict[str, Any] | None = None


def _split(
    cfg: RunConfig, rank: RankContext | None, tokenizer: Any, *, what: str
) -> tuple[Any, _Split]:
    """(tokenizer, `_Split`) of the config's set: prepared if missing, opened, its documents
    split (held out by `data.val_split` unless `data.val` is set), `data.max_samples`."""
    from kiln.data.shards.dataset import shard_examples, split_documents
    from kiln.data.shards.prepare import STATS
    from kiln.data.shards.reader import ShardSet
    from kiln.models import build_tokenizer

    prepared = _prepare(cfg, rank)
    tokenizer = build_tokenizer(cfg, None) if tokenizer is None else tokenizer
    shards = ShardSet.open(prepared.directory, expect_tokenizer=tokenizer, verify="index")
    stats = json.loads((prepared.directory / STATS).read_text())
    lengths = shards.document_lengths()
    n, data = len(shards), cfg.data
    val: Any = None
    if data.val is not None:
        train_docs = np.arange(n, dtype=np.int64)
    else:
        train_docs, val_docs = split_documents(n, data.val_split, cfg.seed)
        if not train_docs.size:
            raise DataError(
                f"data.val_split: holding out {val_docs.size} of {n} documents leaves no "
                "training documents; lower data.val_split or set data.val"
            )
        if val_docs.size:
            source = f"held-out data.val_split of {data.train}"
            val = shard_examples(shards, val_docs, lengths, cfg, what=f"validation data ({source})")
            stats["val_rows"], stats["val_examples"] = int(val_docs.size), len(val)
            stats["val_tokens"] = val.num_tokens
    if data.max_samples is not None and train_docs.size > data.max_samples:
        stats.setdefault("dropped", {})["max_samples"] = int(train_docs.size - data.max_samples)
        train_docs = train_docs[: data.max_samples]
    by_doc = values = None
    if data.curriculum is not None and reads_rows(cfg):
        from kiln.data.shards.values import document_values, order_documents

        by_doc = document_values(cfg, prepared.directory, n, rank)
        if cfg.task == "causal_lm" and data.packing:
            train_docs = order_documents(by_doc, train_docs)
    train = shard_examples(shards, train_docs, lengths, cfg, what=what)
    if by_doc is not None:
        from kiln.data.shards.values import per_example

        values = per_example(by_doc, train.docs)
    stats.update(
        train_rows=int(train_docs.size),
        train_examples=len(train),
        train_tokens=train.num_tokens,
        shards=str(prepared.directory),
    )
    return tokenizer, _Split(shards, train, val, stats, values)


def _mixture_data(cfg: RunConfig, rank: RankContext | None) -> ShardData:
    """`data.sources`: each source's set split on its own, the training examples mixed by
    weight (`Mixture.weighted`), the held-out ones concatenated (or `data.val`)."""
    from kiln.data.prepare import load_eval_data
    from kiln.data.sampler import epoch_permutation
    from kiln.data.shards.mixture import Mixture, source_config, source_error, weights_of

    sources = cfg.data.sources
    assert sources is not None
    names = [s.label for s in sources]
    tokenizer, splits = None, []
    for k, name in enumerate(names):
        try:
            tokenizer, got = _split(
                source_config(cfg, k), rank, tokenizer, what=f"data.sources.{k} ({name})"
            )
        except KilnError as exc:
            raise source_error(exc, k) from None
        splits.append(got)
    trains = [s.train for s in splits]
    order = None  # each epoch's order, unless it depends on the mixture's lengths
    if not (cfg.data.group_by_length and trains[0].blocks is None):
        total = sum(len(t) for t in trains)

        def order(epoch: int) -> Any:
            return epoch_permutation(total, cfg.seed, epoch)

    train = Mixture.weighted(trains, names, weights_of(sources), cfg.seed, order)
    stats = _summed([s.stats for s in splits])
    stats["sources"] = train.stats()
    for name, got in zip(names, splits, strict=True):
        stats["sources"][name] = {
            "documents": len(got.shards),
            **stats["sources"][name],
            "shards": got.stats["shards"],
        }
    stats.update(train_examples=len(train), train_tokens=train.num_tokens)
    val: Any = None
    val_rows = None
    if cfg.data.val is not None:
        val_rows, val, val_stats = load_eval_data(cfg, tokenizer, cfg.data.val)
        stats["val_rows"], stats["val_examples"] = len(val_rows), len(val)
        stats["val_tokens"] = val_stats.val_tokens
    elif all(s.val is not None for s in splits):
        val = Mixture.concat([s.val for s in splits], names)
        stats["val_examples"], stats["val_tokens"] = len(val), val.num_tokens
    log.info("training from a mixture of %d sources: %r", len(splits), train)
    return ShardData(tokenizer, train, val, val_rows, stats)  # type: ignore[arg-type]


def _summed(all_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The sources' counts added up: integers, and dicts of integers (`dropped`), by key."""
    out: dict[str, Any] = {}
    for stats in all_stats:
        for key, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                into = out.setdefault(key, {})
                for name, count in value.items():
                    into[name] = into.get(name, 0) + count
    return out
