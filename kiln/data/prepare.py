"""The data pipeline of a run: read -> check -> filter -> dedup -> split -> tokenize.

`load_splits` turns the config's files into train/val rows (every row checked, every drop
counted in `DataStats`); `build_datasets` renders and tokenizes them for the task;
`prepare_data` does both. Each filter is a small function over rows, so later stages
(curriculum, augmentation, more sources) slot in without touching the others.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from kiln.data.dataset import TokenDataset
from kiln.data.sources import Row, _Problems, json_type, read_rows, where
from kiln.data.tasks import TaskFormat, make_format, render_rows
from kiln.data.tokenize import tokenize_causal, tokenize_seq2seq
from kiln.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PreTrainedTokenizerBase

    from kiln.config import RunConfig

__all__ = [
    "DataStats",
    "build_datasets",
    "dedup_mask",
    "load_splits",
    "prepare_data",
    "quality_mask",
    "split_indices",
]


def _drop_reasons() -> dict[str, int]:
    return {"low_quality": 0, "duplicate": 0, "max_samples": 0}


@dataclass
class DataStats:
    """Counts of a run's data, from the files to the token datasets.

    `rows_read` and `dropped` cover the training file and, when set, the validation file.
    `dropped` maps a reason to the rows it removed: low_quality (below data.min_quality_score),
    duplicate (same rendered text as an earlier row), max_samples (training rows past the cap).
    Tokens are target tokens (those the loss is computed on; see `TokenDataset.num_tokens`).
    """

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=_drop_reasons)
    train_rows: int = 0
    val_rows: int = 0
    train_examples: int = 0
    val_examples: int = 0
    train_tokens: int = 0
    val_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict."""
        return asdict(self)


def quality_mask(
    rows: Sequence[Mapping[str, Any]], quality_field: str, min_score: float
) -> list[bool]:
    """Which rows have `quality_field` >= `min_score`.

    Raises:
        DataError: rows without a finite numeric `quality_field`, each named `file:line`.
    """
    keep = []
    problems = _Problems()
    for i, row in enumerate(rows):
        score = row.get(quality_field)
        if quality_field not in row:
            problems.add(
                f"{where(row, i)}: missing field '{quality_field}' "
                "(needed by data.min_quality_score)"
            )
        elif isinstance(score, bool) or not isinstance(score, (int, float)):
            problems.add(
                f"{where(row, i)}: field '{quality_field}' must be a number, got {json_type(score)}"
            )
        elif not math.isfinite(score):
            problems.add(f"{where(row, i)}: field '{quality_field}' must be finite, got {score}")
        keep.append(isinstance(score, (int, float)) and score >= min_score)
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


def _clean(
    rows: list[Row], fmt: TaskFormat, cfg: RunConfig, stats: DataStats, path: str
) -> list[Row]:
    """Check, quality-filter and deduplicate one file's rows, counting drops in `stats`."""
    data = cfg.data
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    rendered = render_rows(fmt, rows)  # checks every row has what the task needs
    n_low = 0
    if data.min_quality_score is not None:
        keep = quality_mask(rows, data.quality_field, data.min_quality_score)
        n_low = keep.count(False)
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
        rendered = [r for r, k in zip(rendered, keep, strict=True) if k]
    keep = dedup_mask(rendered)
    n_dup = keep.count(False)
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    stats.dropped["low_quality"] += n_low
    stats.dropped["duplicate"] += n_dup
    if not rows:
        n_read = n_low + n_dup
        reasons = []
        if n_low:
            reasons.append(f"{n_low} below data.min_quality_score={data.min_quality_score}")
        if n_dup:
            reasons.append(f"{n_dup} duplicates")
        raise DataError(
            f"{path}: no rows left after filtering ({n_read} read: {', '.join(reasons)})"
        )
    return rows


def load_splits(cfg: RunConfig) -> tuple[list[Row], list[Row], DataStats]:
    """Read, check, filter and split the run's data into train and validation rows.

    Every row is checked for the fields the task needs; then rows below
    `data.min_quality_score` and exact duplicates (by rendered text, first one kept) are
    dropped. Validation rows come from `data.val` (checked and filtered the same way) or, when
    unset, from a split of the training rows (`split_indices`, seeded by `cfg.seed`).
    Finally `data.max_samples` caps the training rows. Rows keep their file order.

    Returns:
        (train rows, val rows, stats); val rows may be empty (val_split=0, no data.val).

    Raises:
        DataError: unreadable files, bad rows (named `file:line`), or no training rows left.
    """
    data = cfg.data
    fmt = make_format(cfg)
    stats = DataStats()
    train = read_rows(data.train)
    stats.rows_read += len(train)
    train = _clean(train, fmt, cfg, stats, data.train)
    if data.val is not None:
        val = read_rows(data.val)
        stats.rows_read += len(val)
        val = _clean(val, fmt, cfg, stats, data.val)
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
    stats.train_rows, stats.val_rows = len(train), len(val)
    return train, val, stats


def _tokenize(
    cfg: RunConfig,
    fmt: TaskFormat,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    what: str,
) -> TokenDataset:
    data = cfg.data
    rendered = render_rows(fmt, rows)
    if cfg.task == "seq2seq":
        sources = [r[0] for r in rendered]
        targets = [r[1] for r in rendered]
        return tokenize_seq2seq(
            sources, targets, tokenizer, data.max_length, data.max_target_length
        )
    texts = [r[0] for r in rendered]
    return tokenize_causal(texts, tokenizer, data.max_length, data.packing, what=what)


def build_datasets(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    *,
    stats: DataStats | None = None,
) -> tuple[TokenDataset, TokenDataset | None, DataStats]:
    """Render and tokenize train and validation rows for the run's task.

    causal_lm: `data.text_field`, packed into blocks of `data.max_length` (or truncated to it
    without `data.packing`); seq2seq: the data templates, truncated to `data.max_length` and
    `data.max_target_length`.

    Args:
        cfg: the run config.
        tokenizer: a transformers tokenizer with an eos token.
        train_rows: rows, e.g. from `load_splits` (plain dicts work too).
        val_rows: validation rows; empty for no validation set.
        stats: counts from `load_splits`, copied and completed; default: fresh counts.

    Returns:
        (train dataset, val dataset or None when `val_rows` is empty, stats).
    """
    if not train_rows:
        raise DataError("no training rows to tokenize")
    stats = replace(stats, dropped=dict(stats.dropped)) if stats is not None else DataStats()
    stats.train_rows, stats.val_rows = len(train_rows), len(val_rows)
    fmt = make_format(cfg)
    train = _tokenize(cfg, fmt, tokenizer, train_rows, f"training data ({cfg.data.train})")
    stats.train_examples, stats.train_tokens = len(train), train.num_tokens
    val = None
    if val_rows:
        source = cfg.data.val or f"held-out data.val_split of {cfg.data.train}"
        val = _tokenize(cfg, fmt, tokenizer, val_rows, f"validation data ({source})")
        stats.val_examples, stats.val_tokens = len(val), val.num_tokens
    return train, val, stats


def prepare_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenDataset, TokenDataset | None, DataStats]:
    """`load_splits` then `build_datasets`: the run's datasets from its config."""
    train_rows, val_rows, stats = load_splits(cfg)
    return build_datasets(cfg, tokenizer, train_rows, val_rows, stats=stats)
