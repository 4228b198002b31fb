"""What the trainer builds from the config before the loop: datasets given as Python objects,
the tokenizer's corpus, the curriculum and augmentation, and the number of optimizer steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kiln.data import TokenDataset, make_format, render_rows
from kiln.data.augment import AugmentedDataset, build_augmenters, tokenizer_for
from kiln.data.curriculum import Curriculum
from kiln.errors import KilnError

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
    "eligible_samples",
    "input_tokens",
    "make_cursor",
    "tokenizer_corpus",
    "total_steps",
]


def as_dataset(data: Any, task: str) -> TokenDataset:
    """Training or validation data given to `Trainer` as Python objects, as a TokenDataset.

    A TokenDataset, an (N, L) tensor of token ids, a list of example dicts (`input_ids`,
    optional `labels`), or a list of token-id lists.
    """
    if isinstance(data, TokenDataset):
        return data
    if isinstance(data, torch.Tensor):
        return TokenDataset(data)
    if isinstance(data, Sequence) and data and isinstance(data[0], dict):
        ids = [list(map(int, ex["input_ids"])) for ex in data]
        labels = [list(map(int, ex["labels"])) for ex in data] if "labels" in data[0] else None
        # Causal labels line up with input_ids (the loss shifts them); seq2seq labels do not.
        return TokenDataset(ids, labels, aligned=labels is not None and task != "seq2seq")
    if isinstance(data, Sequence):
        return TokenDataset([list(map(int, x)) for x in data])
    raise TypeError(f"cannot use {type(data).__name__} as data for task {task}")


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
