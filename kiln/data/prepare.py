"""The data pipeline of a run: read -> check -> filter -> dedup -> split -> tokenize.

`load_splits` turns the config's files into train/val rows (every row checked, every drop
counted in `DataStats`); `build_datasets` renders and tokenizes them for the task;
`prepare_data` does both; `load_eval_data` does the same for one more dataset, as validation
data (for `kiln eval`). Each filter is a small function over rows, so later stages
(curriculum, augmentation, more sources) slot in without touching the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from kiln.data.cache import cached_dataset
from kiln.data.curriculum import order_rows
from kiln.data.dataset import TokenDataset
from kiln.data.progress import Progress
from kiln.data.python import PythonRows
from kiln.data.sources import BadRows, ReadOptions, Row, _Problems, json_type, read_rows, where
from kiln.data.tasks import TaskFormat, make_format, render_rows
from kiln.data.tokenize import encode_workers, tokenize_task
from kiln.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PreTrainedTokenizerBase

    from kiln.config import DataConfig, RunConfig

__all__ = [
    "DataStats",
    "build_datasets",
    "clean_items",
    "dedup_mask",
    "load_eval_data",
    "load_splits",
    "prepare_data",
    "quality_mask",
    "split_indices",
]

log = logging.getLogger("kiln")


def _drop_reasons() -> dict[str, int]:
    return {"low_quality": 0, "duplicate": 0, "max_samples": 0}


@dataclass
class DataStats:
    """Counts of a run's data, from the files to the token datasets.

    `rows_read`, `dropped` and `bad_rows` cover the training data and, when set, the
    validation data; `rows_read` counts every row read, bad ones included, so it equals
    `bad_rows` + the drops of `load_splits` + `train_rows` + `val_rows`. `dropped` maps a
    reason to the rows it removed: low_quality (below data.min_quality_score), too_short /
    too_long (rendered text outside data.min_chars / data.max_chars, present when set; too_long
    also counts JSONL lines too big to parse, see `kiln.data.limits.max_line_bytes`),
    duplicate (same rendered text as an earlier row), max_samples (training rows past the
    cap); `build_datasets` may add its own (no_target). `bad_rows` counts malformed rows
    skipped under data.on_bad_row=skip, `bad_row_examples` holds the first 5 found (per side:
    unreadable rows, then rows failing the field checks), each a one-line problem naming the
    row's location, e.g. `train.jsonl:7: missing field 'text'`. Tokens are target tokens
    (those the loss is computed on; see `TokenDataset.num_tokens`).
    """

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=_drop_reasons)
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    train_rows: int = 0
    val_rows: int = 0
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    val_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict."""
        return asdict(self)


def _score(value: Any) -> float | None:
    """A quality score as a float: a number, or a string holding one (CSV values are strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range (JSON allows any length)
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _quality_problem(row: Mapping[str, Any], index: int, quality_field: str) -> str | None:
    """What is wrong with a row's quality score, or None when it is a finite number."""
    if quality_field not in row:
        return (
            f"{where(row, index)}: missing field '{quality_field}' "
            "(needed by data.min_quality_score)"
        )
    value = row[quality_field]
    score = _score(value)
    if score is None:
        got = f"string {value!r}" if isinstance(value, str) else json_type(value)
        return f"{where(row, index)}: field '{quality_field}' must be a number, got {got}"
    if not math.isfinite(score):
        # Such an int may have thousands of digits (or too many for str()): not in a message.
        got = "an integer beyond the float range" if isinstance(value, int) else value
        return f"{where(row, index)}: field '{quality_field}' must be finite, got {got}"
    return None


def quality_mask(
    rows: Sequence[Mapping[str, Any]], quality_field: str, min_score: float
) -> list[bool]:
    """Which rows have `quality_field` >= `min_score` (a number, or a numeric string).

    Raises:
        DataError: rows without a finite numeric `quality_field`, each named `file:line`.
    """
    keep = []
    problems = _Problems()
    for i, row in enumerate(rows):
        problem = _quality_problem(row, i, quality_field)
        if problem is not None:
            problems.add(problem)
        keep.append(problem is None and (_score(row[quality_field]) or 0.0) >= min_score)
    problems.raise_if_any()
    return keep


def dedup_mask(keys: Sequence[Hashable]) -> list[bool]:
    """True for the first occurrence of each key, False for its exact repeats."""
    seen: set[Hashable] = set()
    keep = []
    for key in keys:
        keep.append(key not in seen)
        seen.add(key)
    return keep


def _chars(rendered: tuple[str, ...]) -> int:
    """Length of a rendered row: its characters over all parts (source + target, ...)."""
    return sum(len(part) for part in rendered)


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of `n` rows: (train indices, val indices), each ascending.

    A permutation seeded by `seed` alone puts its first ceil(val_split * n) indices in val, so
    the split does not depend on anything else in the config (batch size, epochs, ...).
    """
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceil is 4.
    n_val = math.ceil(round(val_split * n, 9))
    gen = torch.Generator().manual_seed(seed & ((1 << 64) - 1))
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


_Item = tuple[Row, tuple[str, ...]]  # a row and its rendering


def _keep(items: list[_Item], keep: list[bool]) -> list[_Item]:
    return [item for item, k in zip(items, keep, strict=True) if k]


def _render_checked(fmt: TaskFormat, rows: list[Row], bad: BadRows) -> list[_Item]:
    """Render every row for the task; bad rows raise together, or are reported and left out."""
    if not bad.skip:
        return list(zip(rows, render_rows(fmt, rows), strict=True))
    items = []
    for i, row in enumerate(rows):
        try:
            items.append((row, fmt.render(row, i)))
        except DataError as exc:  # missing field, wrong type, unrenderable template
            bad.add(exc.problems[0])
    return items


def _clean(
    rows: list[Row], fmt: TaskFormat, data: DataConfig, bad: BadRows
) -> tuple[list[Row], dict[str, int]]:
    """Check, filter and deduplicate rows: (kept rows, rows dropped per reason).

    The order: field checks (bad rows), quality score, length, duplicates, each on the rows
    the previous step kept.
    """
    items, drops = clean_items(rows, fmt, data, bad)
    return [row for row, _ in items], drops


def clean_items(
    rows: list[Row], fmt: TaskFormat, data: DataConfig, bad: BadRows
) -> tuple[list[tuple[Row, tuple[str, ...]]], dict[str, int]]:
    """`_clean`'s work, keeping each row's rendering: ((row, rendered parts) kept, drops per
    reason). `data.dedup` finds duplicates within `rows` only (a streaming caller turns it off
    and deduplicates across its batches itself)."""
    items = _render_checked(fmt, rows, bad)
    drops: dict[str, int] = {}
    if data.min_quality_score is not None:
        if bad.skip:
            problems = [
                _quality_problem(row, i, data.quality_field) for i, (row, _) in enumerate(items)
            ]
            for problem in problems:
                if problem is not None:
                    bad.add(problem)
            items = _keep(items, [p is None for p in problems])
        keep = quality_mask([row for row, _ in items], data.quality_field, data.min_quality_score)
        drops["low_quality"] = keep.count(False)
        items = _keep(items, keep)
    if data.min_chars is not None:
        keep = [_chars(rendered) >= data.min_chars for _, rendered in items]
        drops["too_short"] = keep.count(False)
        items = _keep(items, keep)
    if data.max_chars is not None:
        keep = [_chars(rendered) <= data.max_chars for _, rendered in items]
        drops["too_long"] = keep.count(False)
        items = _keep(items, keep)
    if data.dedup:
        keep = dedup_mask([rendered for _, rendered in items])
        drops["duplicate"] = keep.count(False)
        items = _keep(items, keep)
    return items, drops


def _spec_name(spec: str | list[str] | PythonRows) -> str:
    return ", ".join(spec) if isinstance(spec, list) else str(spec)


def _why_empty(data: DataConfig, n_bad: int, drops: dict[str, int]) -> str:
    """The reasons no row survived, e.g. `2 bad rows (...), 3 below data.min_quality_score=0.5`."""
    labels = {
        "low_quality": f"below data.min_quality_score={data.min_quality_score}",
        "too_short": f"shorter than data.min_chars={data.min_chars}",
        "too_long": f"longer than data.max_chars={data.max_chars}",
        "duplicate": "duplicates",
    }
    reasons = [f"{n_bad} bad rows (data.on_bad_row=skip)"] if n_bad else []
    reasons += [f"{drops[key]} {label}" for key, label in labels.items() if drops.get(key)]
    return ", ".join(reasons)


def _load(
    spec: str | list[str] | PythonRows,
    fmt: TaskFormat,
    data: DataConfig,
    options: ReadOptions,
    stats: DataStats,
) -> list[Row]:
    """Read one side's sources (data.train or data.val) and clean them, counting in `stats`."""
    name, bad = _spec_name(spec), options.bad
    bad_before, unparsed_before = bad.count, options.too_long
    rows = spec.read(options) if isinstance(spec, PythonRows) else read_rows(spec, options)
    unparsed = options.too_long - unparsed_before  # lines too big to parse: too_long already
    n_read = len(rows) + bad.count - bad_before + unparsed
    stats.rows_read += n_read
    if n_read == 0:
        raise DataError(f"{name}: no rows (the data is empty)")
    progress = Progress(f"checking {name}")
    rows, drops = _clean(rows, fmt, data, bad)
    progress.done(f"checked and filtered {n_read:,} rows of {name}")
    if unparsed:
        drops["too_long"] = drops.get("too_long", 0) + unparsed
    for reason, n in drops.items():
        stats.dropped[reason] = stats.dropped.get(reason, 0) + n
    if not rows:
        why = _why_empty(data, bad.count - bad_before, drops)
        first = bad.examples[bad_before] if bad_before < len(bad.examples) else None
        example = f"; first bad row: {first}" if first else ""
        raise DataError(f"{name}: no rows left after filtering ({n_read} read: {why}){example}")
    return rows


def load_splits(
    cfg: RunConfig, *, train: PythonRows | None = None, val: PythonRows | None = None
) -> tuple[list[Row], list[Row], DataStats]:
    """Read, check, filter and split the run's data into train and validation rows.

    Sources are read as `data.format` says (see `kiln.data.sources`). Every row is checked for
    the fields the task needs; a malformed row stops the run with its `file:line`
    (`data.on_bad_row=error`), or is skipped and counted (`skip`; a warning on the "kiln"
    logger names the first 5). Then rows below `data.min_quality_score`, rows whose rendered
    text is shorter than `data.min_chars` or longer than `data.max_chars` (100,000 by default,
    which bounds the work per row: JSONL lines far bigger are dropped before parsing, text-file
    lines are cut into rows of that size instead), and (with `data.dedup`) exact duplicates by
    rendered text (first one kept) are dropped, in that order. Validation rows come from
    `data.val` (checked and filtered the same way; duplicates are found within each side) or,
    when unset, from a split of the training rows (`split_indices`, seeded by `cfg.seed`).
    Rows given in Python (`train`, `val`: `Trainer(train_data=..., val_data=...)`) stand in for
    the files: `train` replaces data.train and data.val (validation then comes from `val`, else
    from the split), `val` replaces data.val. Finally `data.max_samples` caps the training rows.
    Rows keep their source order, except that a curriculum over packed data sorts the training
    rows by difficulty (`kiln.data.curriculum.order_rows`).

    Returns:
        (train rows, val rows, stats); val rows may be empty (val_split=0, no data.val).

    Raises:
        DataError: unreadable sources, bad rows (named `file:line`) unless skipped, or no
            rows left (naming how many each filter dropped).
    """
    data = cfg.data
    fmt = make_format(cfg)
    stats = DataStats()
    for reason, limit in (("too_short", data.min_chars), ("too_long", data.max_chars)):
        if limit is not None:
            stats.dropped[reason] = 0
    options = ReadOptions.from_config(data)
    if train is None and data.train is None:
        raise DataError("data.train: not set; set it, or pass train_data to the Trainer")
    val_spec = val if val is not None else (data.val if train is None else None)
    train = _load(data.train if train is None else train, fmt, data, options, stats)
    if val_spec is not None:
        val = _load(val_spec, fmt, data, options, stats)
    else:
        train_idx, val_idx = split_indices(len(train), data.val_split, cfg.seed)
        if not train_idx:
            raise DataError(
                f"data.val_split: holding out {len(val_idx)} of {len(train)} rows leaves no "
                "training rows; lower data.val_split or set data.val"
            )
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    if data.max_samples is not None and len(train) > data.max_samples:
        stats.dropped["max_samples"] = len(train) - data.max_samples
        train = train[: data.max_samples]
    train = order_rows(cfg, train)
    stats.train_rows, stats.val_rows = len(train), len(val)
    stats.bad_rows, stats.bad_row_examples = options.bad.count, list(options.bad.examples)
    if options.bad.count:
        log.warning(
            "skipped %d bad rows (data.on_bad_row=skip); first: %s",
            options.bad.count,
            " | ".join(options.bad.examples),
        )
    return train, val, stats


def _tokenize(
    cfg: RunConfig,
    fmt: TaskFormat,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    what: str,
    rendered: Sequence[tuple[str, ...]] | None = None,
) -> TokenDataset:
    """Render rows and tokenize them for the task (`tokenize_task`), naming rows `file:line`."""
    rendered = render_rows(fmt, rows) if rendered is None else rendered
    locations = [where(row, i) for i, row in enumerate(rows)]
    return tokenize_task(cfg.task, rendered, tokenizer, cfg.data, what=what, locations=locations)


def _tokenize_cached(
    cfg: RunConfig,
    fmt: TaskFormat,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    what: str,
) -> TokenDataset:
    """Tokenize rows for the task through the cache (`data.cache_dir`), `data.num_workers`."""
    rendered = render_rows(fmt, rows)

    def build() -> TokenDataset:
        with encode_workers(cfg.data.num_workers or 0):  # unset: in this process
            return _tokenize(cfg, fmt, tokenizer, rows, what, rendered)

    dataset = cached_dataset(cfg, tokenizer, rendered, build, what=what)
    if cfg.task == "preference":  # the cache holds the 2N sequences; the loop draws N pairs
        from kiln.data.preference import PreferenceDataset

        return PreferenceDataset(dataset)  # type: ignore[return-value]
    return dataset


def build_datasets(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    *,
    stats: DataStats | None = None,
    names: tuple[Any, Any] | None = None,
) -> tuple[TokenDataset, TokenDataset | None, DataStats]:
    """Render and tokenize train and validation rows for the run's task.

    causal_lm: `data.text_field`, packed into blocks of `data.max_length` (or truncated to it
    without `data.packing`); seq2seq: the data templates, truncated to `data.max_length` and
    `data.max_target_length`; instruction: prompt + response + EOS with the loss on the
    response (`tokenize_instruction`), at most `data.max_length` tokens per sample. Samples it
    drops (no room for a response token) are counted in `stats.dropped["no_target"]`.

    Args:
        cfg: the run config.
        tokenizer: a transformers tokenizer with an eos token.
        train_rows: rows, e.g. from `load_splits` (plain dicts work too).
        val_rows: validation rows; empty for no validation set.
        stats: counts from `load_splits`, copied and completed; default: fresh counts.
        names: (training, validation) data as named in messages; default: data.train and
            data.val (None: a split of the training data).

    Returns:
        (train dataset, val dataset or None when `val_rows` is empty, stats).
    """
    if not train_rows:
        raise DataError("no training rows to tokenize")
    stats = replace(stats, dropped=dict(stats.dropped)) if stats is not None else DataStats()
    stats.train_rows, stats.val_rows = len(train_rows), len(val_rows)
    fmt = make_format(cfg)
    tokenize = _tokenize_cached
    train_name, val_name = names or (cfg.data.train, cfg.data.val)
    train = tokenize(cfg, fmt, tokenizer, train_rows, f"training data ({train_name})")
    stats.train_examples, stats.train_tokens = len(train), train.num_tokens
    val = None
    if val_rows:
        source = val_name or f"held-out data.val_split of {train_name}"
        val = tokenize(cfg, fmt, tokenizer, val_rows, f"validation data ({source})")
        stats.val_examples, stats.val_tokens = len(val), val.num_tokens
    if cfg.task in ("instruction", "chat", "preference"):  # one per row, less those dropped
        kept = len(train) + (len(val) if val is not None else 0)
        stats.dropped["no_target"] = len(train_rows) + len(val_rows) - kept
    if cfg.task == "chat" and cfg.data.packing:  # whole conversations in blocks (training only)
        from kiln.data.chat import PackedConversations

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        train = PackedConversations(train, cfg.data.max_length, pad)  # type: ignore[assignment]
        stats.train_examples = len(train)
    return train, val, stats


def prepare_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenDataset, TokenDataset | None, DataStats]:
    """`load_splits` then `build_datasets`: the run's datasets from its config."""
    train_rows, val_rows, stats = load_splits(cfg)
    return build_datasets(cfg, tokenizer, train_rows, val_rows, stats=stats)


def load_eval_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, source: str | list[str]
) -> tuple[list[Row], TokenDataset, DataStats]:
    """Read, check, filter and tokenize `source` exactly as the run's validation data is.

    The `data` section decides everything: format, fields or templates, read limits
    (data.max_chars), data.on_bad_row, min_quality_score, min_chars / max_chars, dedup, and
    tokenization (through the cache, `data.cache_dir`). Packed documents attend across each
    other unless `data.isolate_documents`, as in training.

    Returns:
        (rows kept, in source order; the dataset; stats: rows_read, dropped, bad_rows, and
        val_rows / val_examples / val_tokens for this data).

    Raises:
        DataError: unreadable source, bad rows (named `file:line`) unless skipped, or no rows
            left after filtering.
    """
    fmt = make_format(cfg)
    stats = DataStats()
    options = ReadOptions.from_config(cfg.data)
    rows = _load(source, fmt, cfg.data, options, stats)
    what = f"evaluation data ({_spec_name(source)})"
    dataset = _tokenize_cached(cfg, fmt, tokenizer, rows, what)
    if not cfg.data.isolate_documents:
        dataset = dataset.without_documents()
    stats.val_rows = len(rows)
    stats.val_examples, stats.val_tokens = len(dataset), dataset.num_tokens
    stats.bad_rows, stats.bad_row_examples = options.bad.count, list(options.bad.examples)
    return rows, dataset, stats
