"""What the trainer builds from the config before the loop: datasets given as Python objects
(text rows for the file pipeline, or token examples; docs/python_data.md), the tokenizer's
corpus (or, for token ids alone, an id tokenizer), the curriculum and augmentation, and the
number of optimizer steps."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import torch

from kiln.data import TokenDataset, make_format, render_rows, split_indices
from kiln.data.augment import AugmentedDataset, build_augmenters, tokenizer_for
from kiln.data.curriculum import Curriculum
from kiln.data.python import (
    PythonRows,
    TokenExamples,
    dataset_dict_splits,
    iter_ids,
    python_data,
)
from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kiln.config import RunConfig
    from kiln.data import BatchCursor
    from kiln.engine.parts import Parts
    from kiln.engine.state import TrainState
    from kiln.rank import RankContext

__all__ = [
    "as_dataset",
    "build_schedule",
    "check_token_range",
    "eligible_samples",
    "id_tokenizer",
    "input_tokens",
    "make_cursor",
    "python_sources",
    "token_splits",
    "token_tokenizer",
    "tokenizer_corpus",
    "total_steps",
]

log = logging.getLogger("kiln")


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
    field = cfg.data.text_field
    sources: list[Source | None] = []
    for obj, name in ((train, "train_data"), (val, "val_data")):
        if obj is None or isinstance(obj, TokenDataset):
            sources.append(obj)
        else:
            sources.append(python_data(obj, name, text_field=field))
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


def id_tokenizer(vocab_size: int) -> Any:
    """A tokenizer whose tokens are the ids themselves, for token-id data given without one.

    Text is ids separated by whitespace: `"5 7"` encodes to [5, 7], and `decode([5, 7])` is
    `" 5 7"` (each id after a space, so that a continuation appends to its prompt, as BPE
    tokens do). Two special tokens follow the ids: `<|pad|>` (padding) and `<|endoftext|>`
    (eos, and what anything else encodes to; never in the data). It saves with
    `save_pretrained` like any tokenizer; the model's vocabulary covers `vocab_size + 2`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kiln.models.tokenizer import EOS_TOKEN, PAD_TOKEN

    # Byte-level "Ġ" is a space: token i is " i", split at whitespace and decoded back.
    vocab = {f"\u0120{i}": i for i in range(vocab_size)}
    vocab[PAD_TOKEN], vocab[EOS_TOKEN] = vocab_size, vocab_size + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _is_dataset_dict(obj: Any) -> bool:
    module = sys.modules.get("datasets")  # loaded whenever such an object exists
    return module is not None and isinstance(obj, module.DatasetDict)


def build_schedule(
    cfg: RunConfig, train_data: TokenDataset, train_rows: list[Any] | None, tokenizer: Any
) -> tuple[Curriculum | None, AugmentedDataset | None]:
    """Curriculum (which examples may be drawn) and augmentation, from `cfg.data`."""
    curriculum = augmented = None
    if cfg.data.curriculum is not None:
        curriculum = Curriculum.for_dataset(cfg, train_data, train_rows)
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


def total_steps(
    cfg: RunConfig, n_examples: int, curriculum: Curriculum | None, *, world_size: int = 1
) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs' batches, whichever is less.

    An epoch holds `n_examples // (batch_size x world_size)` global micro-batches. With a
    curriculum (by epoch) an epoch holds only the eligible examples, so the epochs are counted
    one by one.
    """
    train = cfg.train
    steps = []
    if train.max_steps is not None:
        steps.append(train.max_steps)
    if train.num_epochs is not None:
        if curriculum is not None:  # by epoch (config check): epochs differ in length
            micro = curriculum.total_micro_batches(train.num_epochs, train.batch_size * world_size)
        else:
            micro = int(train.num_epochs * (n_examples // (train.batch_size * world_size)))
        steps.append(micro // train.grad_accum_steps)
    total = min(steps)
    if total < 1:
        raise KilnError(
            "train.num_epochs: the run would take 0 optimizer steps "
            f"({n_examples} examples, batch {train.batch_size} x "
            f"{train.grad_accum_steps} accumulation)"
        )
    return total


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a batch on the host: real tokens (padding excluded)."""
    mask = batch.get("attention_mask")
    n = batch["input_ids"].numel() if mask is None else int(mask.sum())
    return n


def tokenizer_corpus(cfg: RunConfig, rows: list[Any]) -> list[str]:
    """Texts to train a tokenizer on: the training split only (never the val rows)."""
    return ["\n".join(parts) for parts in render_rows(make_format(cfg), rows)]


def make_cursor(cfg: RunConfig, parts: Parts, state: TrainState, rank: RankContext) -> BatchCursor:
    """The data cursor at the position `state` records (epoch, global sample index)."""
    from kiln.data import BatchCursor

    lengths = None  # data.group_by_length: batches of similar lengths
    if cfg.data.group_by_length and parts.train_data.blocks is None:
        lengths = parts.train_data.lengths
    return BatchCursor(
        len(parts.train_data),
        cfg.train.batch_size,
        cfg.seed,
        epoch=state.epoch,
        cursor=state.cursor,
        rank=rank.rank,
        world_size=rank.world_size,
        lengths=lengths,
    )


def eligible_samples(parts: Parts, step: int) -> Callable[[int], torch.Tensor] | None:
    """epoch -> the (n,) mask of samples that may be drawn at `step`: the curriculum's, less
    the samples a rollback left out of that epoch; None when every sample may be."""
    curriculum, guard, n = parts.curriculum, parts.guard, len(parts.train_data)
    if curriculum is None and not guard.excluded:
        return None

    def eligible(epoch: int) -> torch.Tensor:
        mask = (
            torch.ones(n, dtype=torch.bool) if curriculum is None else curriculum.mask(epoch, step)
        )
        left_out = guard.mask(epoch, n)
        return mask if left_out is None else mask & left_out

    return eligible
