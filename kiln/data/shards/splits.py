"""The run's training and validation examples from its token shard set (`data.storage: shards`).

    prepare the set if it is missing (`prepare_shards`; the main rank first, the others then
    find it) -> open it (one stat per file) -> split its documents as the in-memory path splits
    rows (`split_documents`) -> `data.max_samples` -> `shard_examples`

Validation comes from `data.val` (read and tokenized in memory, as always: it is small, and
generation metrics need its rows) or from the held-out `data.val_split` of the documents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.data.shards.dataset import ShardDataset
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
    """The tokenizer, train and validation examples, and data_stats, from the shard set.

    Raises:
        KilnError / DataError: one line: an unsupported option, a source or shard problem
            (missing, truncated, another tokenizer's set), too few documents.
    """
    from kiln.data.prepare import load_eval_data
    from kiln.data.shards.dataset import shard_examples, split_documents
    from kiln.data.shards.prepare import STATS
    from kiln.data.shards.reader import ShardSet
    from kiln.models import build_tokenizer

    prepared = _prepare(cfg, rank)
    tokenizer = build_tokenizer(cfg, None)
    shards = ShardSet.open(prepared.directory, expect_tokenizer=tokenizer, verify="index")
    stats = json.loads((prepared.directory / STATS).read_text())
    lengths = shards.document_lengths()
    n, data, what = len(shards), cfg.data, f"training data ({cfg.data.train})"
    val: Any = None
    val_rows = None
    if data.val is not None:
        train_docs = np.arange(n, dtype=np.int64)
        val_rows, val, val_stats = load_eval_data(cfg, tokenizer, data.val)
        stats["val_rows"], stats["val_examples"] = len(val_rows), len(val)
        stats["val_tokens"] = val_stats.val_tokens
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
    train = shard_examples(shards, train_docs, lengths, cfg, what=what)
    stats.update(
        train_rows=int(train_docs.size),
        train_examples=len(train),
        train_tokens=train.num_tokens,
        shards=str(prepared.directory),
    )
    log.info("training from %s: %d examples", shards, len(train))
    return ShardData(tokenizer, train, val, val_rows, stats)
