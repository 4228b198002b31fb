"""The run's data, ready for the loop: what the engine asks data for (`assemble_data`).

From the config's files, or from data given to `Trainer` as Python objects (text rows go
through the files' pipeline; token ids are used as given, docs/python_data.md): the tokenizer
(given, pretrained, trained on the training rows, or an id tokenizer for token ids alone), the
train and validation datasets, their source rows and stats, and the data schedule (curriculum
and augmentation).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.data import (
    TokenDataset,
    build_datasets,
    load_splits,
    make_format,
    render_rows,
    split_indices,
)
from kiln.data.augment import AugmentedDataset, build_augmenters, tokenizer_for
from kiln.data.collate import get_collator
from kiln.data.curriculum import Curriculum
from kiln.data.python import (
    PythonRows,
    TokenExamples,
    dataset_dict_splits,
    iter_ids,
    python_data,
)
from kiln.data.tokenizer_cache import cached_tokenizer
from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.rank import RankContext

__all__ = [
    "Given",
    "RunData",
    "as_dataset",
    "assemble_data",
    "check_token_range",
    "data_schedule",
    "python_sources",
    "token_splits",
    "token_tokenizer",
    "tokenizer_corpus",
]

log = logging.getLogger("kiln")


@dataclass
class Given:
    """Objects the caller passed instead of building them from the config (None: build)."""

    model: Any = None
    tokenizer: Any = None
    train_data: Any = None
    val_data: Any = None


@dataclass
class RunData:
    """The data a run trains on, as `assemble_data` made it."""

    tokenizer: Any
    train: TokenDataset
    val: TokenDataset | None
    train_rows: list[Any] | None = None
    """The source rows, when the data was built from rows (generation eval needs them)."""
    val_rows: list[Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    """data_stats.json: counts kept and dropped (empty for token data)."""
    curriculum: Curriculum | None = None
    augmented: AugmentedDataset | None = None
    train_values: dict[str, Any] | None = None
    """Shards: the curriculum's values of the training examples (the rows are not kept)."""


def assemble_data(
    cfg: RunConfig, given: Given, *, world_size: int = 1, rank: RankContext | None = None
) -> RunData:
    """The run's tokenizer, datasets, rows, stats, curriculum and augmentation, ready for the
    loop: from the config's files (in memory, or from token shards with `data.storage:
    shards`), or from the data the caller gave. `rank`: the ranks prepare shards main first.

    Raises:
        KilnError / DataError: one line naming the key or the data (a bad collator, bad rows,
            fewer training examples than one global batch of `world_size` ranks, ...).
    """
    try:  # a bad name fails here, before minutes of data preparation
        get_collator(cfg.data.collator, cfg.task)
    except (ValueError, KeyError) as exc:
        raise KilnError(f"data.collator: {str(exc).strip(chr(34))}") from None
    if cfg.data.storage == "shards":
        data = _shard_datasets(cfg, given, rank)
    else:
        data = _datasets(cfg, given)
    data.curriculum, data.augmented = data_schedule(
        cfg, data.train, data.train_rows, data.tokenizer, data.train_values
    )
    if not cfg.data.isolate_documents:  # packed documents then attend across each other
        data.train = data.train.without_documents()
        data.val = None if data.val is None else data.val.without_documents()
    global_batch = cfg.train.batch_size * world_size
    if len(data.train) < global_batch:
        raise DataError(
            f"data.train: {len(data.train)} training examples, fewer than one global batch "
            f"(train.batch_size {cfg.train.batch_size} x {world_size} ranks)"
        )
    return data


def _shard_datasets(cfg: RunConfig, given: Given, rank: RankContext | None) -> RunData:
    """Train (and held-out) examples read from the config's token shard set."""
    from kiln.data.shards.splits import shard_data

    for what, obj in (("train_data", given.train_data), ("tokenizer", given.tokenizer)):
        if obj is not None:
            raise KilnError(
                f"data.storage: shards reads data.train with the config's tokenizer; "
                f"{what} was given to the Trainer (use data.storage: memory)"
            )
    got = shard_data(cfg, rank)
    data = RunData(got.tokenizer, got.train, got.val, None, got.val_rows, got.stats)  # type: ignore[arg-type]
    data.train_values = got.train_values
    return data


def _datasets(cfg: RunConfig, given: Given) -> RunData:
    """Tokenizer, train, val, rows and stats: from the config's files, or from the data the
    caller gave. Text rows given in Python go through the files' pipeline (checks, filters,
    templates, val split, tokenization and its cache); token ids are used as given (split by
    data.val_split when no val_data is given)."""
    from kiln.models import build_tokenizer

    tokenizer = given.tokenizer
    train_src, val_src = python_sources(cfg, given.train_data, given.val_data)
    if train_src is not None and not isinstance(train_src, PythonRows):
        if tokenizer is None:
            tokenizer = token_tokenizer(cfg, train_src, val_src)
        elif given.model is None:  # the model's embeddings are sized by the tokenizer
            check_token_range(tokenizer, train_src, val_src)
        train, val = token_splits(cfg, train_src, val_src)  # type: ignore[arg-type]
        return RunData(tokenizer, train, val)
    train_rows, val_rows, stats = load_splits(cfg, train=train_src, val=val_src)  # type: ignore[arg-type]
    if tokenizer is None:  # trained on the training rows, or read back from the cache
        tokenizer = cached_tokenizer(cfg, tokenizer_corpus(cfg, train_rows), build_tokenizer)
    names = None
    if train_src is not None or val_src is not None:
        train_name = train_src if train_src is not None else cfg.data.train
        val_name = (
            val_src if val_src is not None else (None if train_src is not None else cfg.data.val)
        )
        names = (train_name, val_name)
    train, val, stats = build_datasets(
        cfg, tokenizer, train_rows, val_rows, stats=stats, names=names
    )
    return RunData(tokenizer, train, val, train_rows, val_rows, stats.to_dict())


def as_dataset(data: Any, task: str, *, name: str = "train_data") -> TokenDataset:
    """Token data given to `Trainer` as Python objects, as a TokenDataset.

    A TokenDataset (as it is), an (N, L) tensor of token ids, a list (or Dataset) of example
    dicts (`input_ids`, optional `labels`), or of token-id sequences. Text data is refused:
    it goes through `python_sources` and the file pipeline.

    Raises:
        DataError: text rows, or a malformed item (one line naming it, `train_data#3: ...`).
    """
    if isinstance(data, TokenDataset):
        return data
    got = python_data(data, name, text_field="text")
    if isinstance(got, PythonRows):
        raise DataError(f"{name}: text rows, expected token ids")
    return got.dataset(task)


Source = PythonRows | TokenExamples | TokenDataset


def python_sources(cfg: RunConfig, train: Any, val: Any) -> tuple[Source | None, Source | None]:
    """The data given to `Trainer(train_data=..., val_data=...)`, sorted: text rows (which
    `load_splits` reads where files would be) or token examples; None where not given.

    A `datasets.DatasetDict` as `train_data` gives its "train" split, and its "validation"
    (else "test") split as validation data unless `val_data` is given.

    Raises:
        DataError: unsupported data, bad items, or text on one side and tokens on the other.
    """
    if train is not None and _is_dataset_dict(train):
        train, split_val = dataset_dict_splits(train, "train_data")
        val = split_val if val is None else val
    if val is not None and _is_dataset_dict(val):
        val, _ = dataset_dict_splits(val, "val_data")
    field_name = cfg.data.text_field
    sources: list[Source | None] = []
    for obj, name in ((train, "train_data"), (val, "val_data")):
        if obj is None or isinstance(obj, TokenDataset):
            sources.append(obj)
        else:
            sources.append(python_data(obj, name, text_field=field_name))
    train_src, val_src = sources
    train_text = train_src is None or isinstance(train_src, PythonRows)  # None: data.train
    if val_src is not None and isinstance(val_src, PythonRows) != train_text:
        kinds = ("token ids", "text rows") if train_text else ("text rows", "token ids")
        train_what = "train_data" if train_src is not None else "data.train"
        raise DataError(
            f"val_data: {kinds[0]}, but the training data ({train_what}) is {kinds[1]}; "
            "give both as text or both as tokens"
        )
    return train_src, val_src


def token_splits(
    cfg: RunConfig, train: TokenExamples | TokenDataset, val: TokenExamples | TokenDataset | None
) -> tuple[TokenDataset, TokenDataset | None]:
    """Token data as (train, val) datasets: without `val`, `data.val_split` of the training
    examples is held out (`split_indices`, as for rows); `data.max_samples` caps the training
    examples. A TokenDataset is used as it is (no split, no cap)."""
    if isinstance(train, TokenExamples):
        if val is None and cfg.data.val_split > 0:
            train_idx, val_idx = split_indices(len(train), cfg.data.val_split, cfg.seed)
            if not train_idx:
                raise DataError(
                    f"data.val_split: holding out {len(val_idx)} of {len(train)} examples leaves "
                    "no training examples; lower data.val_split or pass val_data"
                )
            train, val = train.subset(train_idx), train.subset(val_idx)
        cap = cfg.data.max_samples
        if cap is not None and len(train) > cap:
            train = train.subset(range(cap))
    as_ds = lambda x: x.dataset(cfg.task) if isinstance(x, TokenExamples) else x  # noqa: E731
    return as_ds(train), None if val is None else as_ds(val)


def token_tokenizer(cfg: RunConfig, *data: TokenExamples | TokenDataset | None) -> Any:
    """A tokenizer for token-id data given without one: the config's pretrained one
    (`tokenizer.name_or_path` / `model.name_or_path`), else `id_tokenizer` over
    `tokenizer.vocab_size` ids when the config sets it, else over the largest id + 1.

    Raises:
        DataError: an id at or above an explicit `tokenizer.vocab_size`.
    """
    from kiln.models import build_tokenizer
    from kiln.models.tokenizer import id_tokenizer

    if cfg.tokenizer.name_or_path is not None or cfg.model.name_or_path is not None:
        return build_tokenizer(cfg, None)
    top, name = max((_max_id(x), x_name) for x, x_name in zip(data, _NAMES, strict=False))
    if "vocab_size" in cfg.tokenizer.model_fields_set:
        size = cfg.tokenizer.vocab_size
        if top >= size:
            raise DataError(f"{name}: token id {top} is >= tokenizer.vocab_size ({size})")
    else:
        size = top + 1
    log.info("token-id data without a tokenizer: ids 0..%d (vocabulary of %d)", size - 1, size)
    return id_tokenizer(size)


_NAMES = ("train_data", "val_data")


def _max_id(data: TokenExamples | TokenDataset | None) -> int:
    if data is None:
        return -1
    if isinstance(data, TokenExamples):
        return data.max_id
    tops = [int(t.max()) for t in iter_ids(data) if t.numel()]
    return max(tops, default=-1)


def check_token_range(tokenizer: Any, *data: TokenExamples | TokenDataset | None) -> None:
    """Refuse token ids the tokenizer's vocabulary (the model's embeddings) does not hold.

    Raises:
        DataError: naming the data and the id.
    """
    size = len(tokenizer)
    for x, name in zip(data, _NAMES, strict=False):
        top = _max_id(x)
        if top >= size:
            raise DataError(
                f"{name}: token id {top} is outside the tokenizer's vocabulary ({size} tokens)"
            )


def _is_dataset_dict(obj: Any) -> bool:
    module = sys.modules.get("datasets")  # loaded whenever such an object exists
    return module is not None and isinstance(obj, module.DatasetDict)


def data_schedule(
    cfg: RunConfig,
    train_data: TokenDataset,
    train_rows: list[Any] | None,
    tokenizer: Any,
    values: dict[str, Any] | None = None,
) -> tuple[Curriculum | None, AugmentedDataset | None]:
    """Curriculum (which examples may be drawn when) and augmentation (how each is rendered
    per epoch), from `cfg.data`. (The learning-rate schedule is `kiln.optim.schedule_for`.)
    `values`: the curriculum's values of the examples, where there are no rows (shards)."""
    curriculum = augmented = None
    if cfg.data.curriculum is not None:
        curriculum = Curriculum.for_dataset(cfg, train_data, train_rows, values)
    if cfg.data.augment:
        if train_rows is None:
            raise KilnError(
                "data.augment: needs the training rows; training data was given as tokens"
            )
        fmt = make_format(cfg)
        augmented = AugmentedDataset(
            train_data,
            train_rows,
            fmt,
            build_augmenters(cfg.data.augment, fmt),
            tokenizer_for(cfg, tokenizer),
            cfg.seed,
        )
    return curriculum, augmented


def tokenizer_corpus(cfg: RunConfig, rows: list[Any]) -> list[str]:
    """Texts to train a tokenizer on: the training split only (never the val rows)."""
    rendered = render_rows(make_format(cfg), rows)
    if cfg.task in ("chat", "preference"):  # the messages' contents, not their JSON
        from kiln.data.chat import conversation_text

        if cfg.task == "chat":
            return [conversation_text(parts[0]) for parts in rendered]
        return [
            "\n".join(parts[1:] if parts[0] == "text" else map(conversation_text, parts[1:]))
            for parts in rendered
        ]
    return ["\n".join(parts) for parts in rendered]
