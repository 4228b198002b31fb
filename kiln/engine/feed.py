"""What the loop draws from the data: the cursor at the position the state records, which
samples may be drawn at a step (curriculum, rollback), the workers that build batches ahead
(`data.loader_workers`), and a batch's input tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from kiln.config import RunConfig
    from kiln.data import BatchCursor
    from kiln.data.prefetch import Prefetcher
    from kiln.engine.parts import Parts
    from kiln.engine.state import TrainState
    from kiln.rank import RankContext

__all__ = ["eligible_samples", "input_tokens", "make_cursor", "make_prefetcher"]


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


def make_prefetcher(cfg: RunConfig, parts: Parts) -> Prefetcher | None:
    """`data.loader_workers` processes building the training batches ahead, or None (0)."""
    if not cfg.data.loader_workers:
        return None
    from kiln.data.prefetch import Prefetcher

    return Prefetcher(
        parts.batcher,
        lambda epoch: epoch_data(parts, epoch),
        cfg.data.loader_workers,
        pin_memory=parts.device.type == "cuda",
    )


def epoch_data(parts: Parts, epoch: int) -> Any:
    """The training data as epoch `epoch` draws it: re-rendered per (seed, epoch, sample)
    with `data.augment`; a mixture's examples of that epoch (`Mixture.for_epoch`); else the
    training data itself."""
    if parts.augmented is not None:
        return parts.augmented.for_epoch(epoch)
    for_epoch = getattr(parts.train_data, "for_epoch", None)
    return parts.train_data if for_epoch is None else for_epoch(epoch)


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


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a batch on the host: real tokens (padding excluded; packed
    conversations, which carry no attention mask, say how many in `real_tokens`)."""
    real = batch.get("real_tokens")
    if real is not None:
        return int(real.sum())
    mask = batch.get("attention_mask")
    n = batch["input_ids"].numel() if mask is None else int(mask.sum())
    return n
