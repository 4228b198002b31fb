"""`kiln data prepare`: stream a config's training sources into a token shard set.

    rows (streamed, `iter_rows`) -> checks and filters (`clean_items`, a batch at a time)
        -> dedup (digests of the rendered texts) -> tokenize (a batch at a time) -> ShardWriter

The rows go through the same checks, filters and task template as `kiln train` (the functions
of `kiln.data.prepare` and `kiln.data.tasks`, a batch of `batch_rows` rows at a time), and a
causal_lm document becomes its ids + EOS, as `tokenize_causal` makes it before packing; an
instruction sample is what `tokenize_instruction` makes of it, with a label mask; a seq2seq
pair is what `tokenize_seq2seq` makes of it, as one document: its input_ids (the source, cut to
`max_length`, + EOS) then its labels (the target, cut to `max_target_length`, + EOS), with a
label mask 0 on the source and 1 on the target (the reader splits the document there). Memory
holds one batch of rows, the writer's staging buffer and, with `data.dedup`, a `DigestSet` of
the distinct documents' 16-byte digests: the newest `MEMORY_KEYS` in a table (8-12 MB), the
rest in sorted runs under `<set>/.dedup/` (16 bytes a document on disk, removed when the set is
complete), so memory does not grow with the corpus.

The shard set lives at `<data.cache_dir>/shards-<key>/`, the key from the source files'
identities, the settings that decide which rows become which tokens, the tokenizer and
`PREPARE_VERSION`. It holds every training document that passes the filters, in source order:
the train/val split (`data.val_split`, `split_indices` over document indices), `max_samples`,
packing and (causal_lm) `max_length` are applied by whoever reads the set, so they are not in
the key; an instruction sample is cut to `max_length` here and a seq2seq pair to `max_length`
and `max_target_length`, so for them those limits (and `truncation`) are in the key.
Document i of the set is always kept row i (after the filters and dedup): an instruction sample
with no target token within `max_length` is an empty document (0 tokens, counted in
`dropped["no_target"]`), so a reader's split by document index is the in-RAM path's split by
row, which comes before that drop; readers skip empty documents.
`stats.json` beside the manifest holds the counts of `data_stats.json` for the set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.data.progress import Progress
from kiln.data.shards.dedup import DigestSet, digest_keys
from kiln.data.shards.encode import DocumentMaker, EncodePool, Rendered, cores
from kiln.data.shards.format import MANIFEST, dtype_for, shard_key, source_identity
from kiln.data.shards.writer import SetComplete, ShardWriter
from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.data.sources import Row

__all__ = [
    "BATCH_ROWS",
    "DEDUP_RUNS",
    "PREPARE_VERSION",
    "STATS",
    "Documents",
    "Prepared",
    "check_supported",
    "prepare_shards",
    "shard_dir",
    "shard_settings",
]

PREPARE_VERSION = 2
"""Version of the rows-to-documents code; bump it when the same config would give other tokens."""

STATS = "stats.json"
"""The shard set's counts (rows read, dropped by reason, bad rows), written beside its manifest."""

DEDUP_RUNS = ".dedup"
"""Where `data.dedup`'s sorted digest runs go inside an unfinished set (removed when done)."""

BATCH_ROWS = 4096
"""Rows checked, filtered and tokenized together: one batch is what memory holds of the corpus."""

# Data settings that do not decide which rows become which documents' tokens: the sources (in
# the key by identity), what is done with the documents when training, and the cache itself.
_NOT_IN_KEY = frozenset(
    {
        "train",
        "val",
        "val_split",
        "max_samples",
        "max_length",
        "max_target_length",
        "truncation",
        "packing",
        "isolate_documents",
        "pad_to_multiple_of",
        "group_by_length",
        "collator",
        "cache_dir",
        "num_workers",
        "loader_workers",
        "storage",
        "sources",  # a mixture's sources: each prepared as data.train, its own set
        "shard_tokens",  # in the key as its own setting (shard_settings)
        "curriculum",
        "augment",
    }
)
# Data settings that decide a sample's tokens (its cut) besides the rows, by task.
_SAMPLE_SHAPE = {
    "instruction": frozenset({"max_length", "truncation"}),
    "seq2seq": frozenset({"max_length", "max_target_length", "truncation"}),
}
_TASKS = ("causal_lm", "instruction", "seq2seq")
_MASKED = frozenset({"instruction", "seq2seq"})
"""Tasks whose documents carry a label mask (instruction: the response; seq2seq: the target)."""
_HF_PREFIX = "hf:"

log = logging.getLogger("kiln")


@dataclass
class Prepared:
    """What `prepare_shards` did: the set's directory and its counts."""

    directory: Path
    existed: bool
    documents: int = 0
    tokens: int = 0
    shards: int = 0
    seconds: float = 0.0
    workers: int = 0
    """Tokenizer processes besides the main one (0: tokenized in the main process)."""
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The one-line summary `kiln data prepare` prints."""
        if self.existed:
            return f"shards exist: {self.directory} (nothing to do)"
        drops = ", ".join(f"{k} {v:,}" for k, v in self.stats.get("dropped", {}).items() if v)
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"prepared {self.documents:,} documents, {self.tokens:,} tokens, {self.shards} "
            f"shards in {self.directory}; bad rows {self.stats.get('bad_rows', 0):,}, dropped: "
            f"{drops or 'none'}; {self.seconds:.1f}s, {rate:,.0f} tokens/s, "
            + (f"{self.workers} tokenizer processes" if self.workers else "tokenized in-process")
        )


def shard_settings(cfg: RunConfig, shard_tokens: int) -> dict[str, Any]:
    """The settings in a shard set's key: the task, the data options that decide the rows and
    their tokens, and the shard size (it decides the files' bytes)."""
    # an instruction or seq2seq sample is cut to its limits when tokenized
    exclude = set(_NOT_IN_KEY) - _SAMPLE_SHAPE.get(cfg.task, frozenset())
    data = cfg.data.model_dump(mode="json", exclude=exclude)
    return {"task": cfg.task, "data": data, "shard_tokens": shard_tokens}


def check_supported(cfg: RunConfig) -> list[str]:
    """The training sources as files, or a one-line error for what prepare cannot do yet."""
    from kiln.data.sources import expand_source

    data = cfg.data
    if cfg.task not in _TASKS:
        raise KilnError(f"task: kiln data prepare supports {', '.join(_TASKS)}, not {cfg.task}")
    if data.train is None:
        raise KilnError("data.train: not set; kiln data prepare reads the training files")
    if data.cache_dir is None:
        raise KilnError("data.cache_dir: not set; kiln data prepare writes the shards there")
    if cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None:
        raise KilnError(
            "tokenizer.name_or_path: not set; kiln data prepare needs a tokenizer to load "
            "(training one needs the whole corpus: not supported by prepare yet)"
        )
    specs = [data.train] if isinstance(data.train, str) else list(data.train)
    sources = [source for spec in specs for source in expand_source(spec)]
    for source in sources:
        if source.startswith(_HF_PREFIX) or data.format == "hf" or Path(source).is_dir():
            raise KilnError(
                f"data.train: {source}: kiln data prepare reads files only so far, not datasets"
            )
        if not Path(source).is_file():
            raise DataError(f"{source}: no such file")
    return sources


def shard_dir(
    cfg: RunConfig, sources: list[str], fingerprint: str | None, shard_tokens: int
) -> tuple[Path, str]:
    """(where the shard set of these sources, settings and tokenizer lives, its key)."""
    identities = [source_identity(source) for source in sources]
    key = shard_key(identities, shard_settings(cfg, shard_tokens), fingerprint, PREPARE_VERSION)
    return Path(cfg.data.cache_dir or "").expanduser() / f"shards-{key}", key


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while batch := list(islice(rows, size)):
        yield batch


def _digest(parts: tuple[str, ...]) -> bytes:
    """16 bytes that tell rendered rows apart (length-prefixed parts, as the cache key does)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


class Documents:
    """The rendered documents of the training sources, in order, with their counts."""

    def __init__(
        self, cfg: RunConfig, sources: list[str], batch_rows: int, spill: Path | None = None
    ) -> None:
        from kiln.data.prepare import DataStats
        from kiln.data.sources import ReadOptions

        self.cfg, self.sources, self.batch_rows = cfg, sources, batch_rows
        self.spill = spill  # where dedup's sorted runs go when its table is full
        self.options = ReadOptions.from_config(cfg.data)
        self.stats = DataStats()
        for reason, limit in (("too_short", cfg.data.min_chars), ("too_long", cfg.data.max_chars)):
            if limit is not None:
                self.stats.dropped[reason] = 0

    def batches(self) -> Iterator[list[tuple[tuple[str, ...], str]]]:
        """Each batch's kept (rendering, `file:line`) pairs (checked, filtered, deduplicated
        across batches)."""
        for kept in self.kept():
            yield [(parts, row.where) for row, parts in kept]

    def kept(self) -> Iterator[list[tuple[Row, tuple[str, ...]]]]:
        """Each batch's kept (row, rendering) pairs: document i of the set is the i-th."""
        from kiln.data.sources import iter_rows
        from kiln.data.tasks import make_format

        data, options = self.cfg.data, self.options
        fmt = make_format(self.cfg)
        per_batch = data.model_copy(update={"dedup": False})  # dedup runs across batches below
        if self.spill is not None:  # the runs of a killed prepare: dedup starts over
            shutil.rmtree(self.spill, ignore_errors=True)
        with DigestSet(spill=self.spill) as seen:
            yield from self._kept(iter_rows(self.sources, options), fmt, per_batch, seen)

    def _kept(
        self, rows_in: Iterator[Row], fmt: Any, per_batch: Any, seen: DigestSet
    ) -> Iterator[list[tuple[Row, tuple[str, ...]]]]:
        from kiln.data.prepare import clean_items

        data, stats, options = self.cfg.data, self.stats, self.options
        yielded = render_bad = 0  # rows the readers gave; those of them the checks refused
        for rows in _batches(rows_in, self.batch_rows):
            bad_before = options.bad.count
            items, drops = clean_items(rows, fmt, per_batch, options.bad)
            yielded += len(rows)
            render_bad += options.bad.count - bad_before
            if data.dedup:
                new = seen.add(digest_keys([_digest(parts) for _, parts in items]))
                drops["duplicate"] = len(items) - int(new.sum())
                items = [item for item, keep in zip(items, new.tolist(), strict=True) if keep]
            for reason, n in drops.items():
                stats.dropped[reason] = stats.dropped.get(reason, 0) + n
            yield items
        # As `load_splits` counts: every row read, bad ones and lines too big to parse included.
        stats.rows_read = yielded + options.bad.count - render_bad + options.too_long
        if options.too_long:
            stats.dropped["too_long"] = stats.dropped.get("too_long", 0) + options.too_long
        stats.bad_rows, stats.bad_row_examples = options.bad.count, list(options.bad.examples)


def _todo(docs: Documents, skip: int) -> Iterator[Rendered]:
    """The batches of kept renderings, less the first `skip` (the documents of the complete
    shards of an interrupted prepare: document i is kept row i). Every row is still read:
    the filters, dedup and counts need them."""
    seen = 0
    for batch in docs.batches():
        todo = batch[max(0, skip - seen) :]
        seen += len(batch)
        if todo:
            yield todo


def _write_documents(
    cfg: RunConfig, docs: Documents, pool: EncodePool, writer: ShardWriter
) -> dict[str, Any]:
    """Write the documents the writer's complete shards do not hold yet, then the set's
    `stats.json`; the counts written."""
    from kiln.files import json_text, write_atomic, writing

    directory = writer.directory
    skip = writer.documents_written  # held by the shards an interrupted prepare wrote
    drops = cfg.task == "instruction"  # samples without a target token: empty documents
    dropped = docs.stats.dropped
    if drops:  # the empty documents of the kept shards are samples dropped as no_target
        dropped["no_target"] = writer.empty_documents_written()
    if skip:
        log.info("%s: continuing after the %s documents of its complete shards", directory, skip)
    progress = Progress(f"preparing {directory}", unit="documents")
    for batch in pool.map(_todo(docs, skip)):
        if drops:
            dropped["no_target"] += batch.no_target
        for ids, mask in batch:
            writer.add(ids, mask)
        progress.update(writer.documents)
    tokens = sum(s["tokens"] for s in writer.shards) + writer.buffered_tokens
    if tokens == 0:  # no rows, or (instruction) only empty documents
        no_target = dropped.get("no_target", 0)
        raise DataError(
            f"data.train: no rows left after filtering ({docs.stats.rows_read} read"
            + (
                f", {no_target} without a target token within data.max_length)"
                if no_target
                else ")"
            )
        )
    # Before the manifest: a set that has one has its counts too.
    stats = docs.stats.to_dict()
    stats.update(documents=writer.documents, tokens=tokens)
    with writing(f"the shard set's counts {directory / STATS}"):
        write_atomic(directory / STATS, json_text(stats, indent=1) + "\n")
    return stats


@contextlib.contextmanager
def _resumable(writer: ShardWriter) -> Iterator[None]:
    """A full disk inside the block says how to continue (exit code 5, one line)."""
    from kiln.files import StorageFull

    try:
        yield
    except StorageFull as exc:
        done = len(writer.shards)
        exc.resume_hint = (
            f"free some space and rerun kiln data prepare: it continues after the "
            f"{done} complete shard{'s' if done != 1 else ''} in {writer.directory}"
        )
        raise


def prepare_shards(
    cfg: RunConfig,
    *,
    shard_tokens: int | None = None,
    batch_rows: int = BATCH_ROWS,
    workers: int | None = None,
) -> Prepared:
    """Write the shard set of the config's training data, or find it already written.

    A set with a manifest is complete: nothing is done. Another process preparing the same
    set is waited for (a log line names it), then its set is found complete (or, if it was
    killed, continued). An unfinished one (a killed prepare) is continued: its complete
    shards are kept and the documents they hold skipped, so the result is the same bytes as an
    uninterrupted prepare.

    Rows are read, checked, filtered and deduplicated here, a batch at a time; `workers`
    processes (default `data.num_workers`, unset: one per core; 0: this one) tokenize the
    batches, in order, so the bytes are the same whatever their number.

    Raises:
        KilnError / DataError: one line: an option prepare does not support yet, a missing
            source file, bad rows (`data.on_bad_row=error`), no rows left.
    """
    from kiln.data.cache import tokenizer_fingerprint
    from kiln.models import build_tokenizer

    start = time.perf_counter()
    shard_tokens = cfg.data.shard_tokens if shard_tokens is None else shard_tokens
    sources = check_supported(cfg)
    tokenizer = build_tokenizer(cfg, None)
    if tokenizer.eos_token_id is None:
        raise KilnError("tokenizer: has no eos_token; kiln ends every document with one")
    fingerprint = tokenizer_fingerprint(tokenizer)
    directory, key = shard_dir(cfg, sources, fingerprint, shard_tokens)
    if (directory / MANIFEST).is_file():
        return Prepared(directory, existed=True)
    masks = cfg.task in _MASKED
    maker = DocumentMaker(
        cfg.task,
        tokenizer,
        dtype_for(len(tokenizer)),
        cfg.data.max_length,
        cfg.data.truncation,
        cfg.data.max_target_length,
    )
    if workers is None:  # data.num_workers unset: all cores
        workers = cores() if cfg.data.num_workers is None else cfg.data.num_workers
    # The pool before the writer: forked workers would hold a copy of its lock on the set.
    with EncodePool(maker, workers) as pool:
        try:  # another prepare of this set (a torchrun rank, a second shell) is waited for
            writer = ShardWriter.resume(
                directory,
                len(tokenizer),
                key,
                fingerprint,
                shard_tokens=shard_tokens,
                with_masks=masks,
                wait=True,
            )
        except SetComplete:  # ... and it completed the set
            return Prepared(directory, existed=True)
        with writer, _resumable(writer):
            docs = Documents(cfg, sources, batch_rows, directory / DEDUP_RUNS)
            stats = _write_documents(cfg, docs, pool, writer)
            manifest = writer.close()
    return Prepared(
        directory,
        existed=False,
        documents=manifest["documents"],
        tokens=manifest["tokens"],
        shards=len(manifest["shards"]),
        seconds=time.perf_counter() - start,
        workers=workers,
        stats=stats,
    )
