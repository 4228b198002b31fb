"""What a run is built from, built at once: device, precision, data, tokenizer, model, batcher,
regularizers, optimizer and schedule (`build_parts`), from the config and what the caller gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kiln.data import build_datasets, load_splits
from kiln.data.collate import Batcher, get_collator
from kiln.data.python import PythonRows
from kiln.data.tokenizer_cache import cached_tokenizer
from kiln.device import Precision, resolve_device
from kiln.engine.anomaly import AnomalyGuard
from kiln.engine.datasetup import (
    build_schedule,
    check_token_range,
    python_sources,
    token_splits,
    token_tokenizer,
    tokenizer_corpus,
    total_steps,
)
from kiln.engine.regularize import Regularizers, build_regularizers
from kiln.errors import DataError, KilnError
from kiln.models.wrap import prepare_for_training
from kiln.optim import build_optimizer, schedule_for
from kiln.process import seed_everything

if TYPE_CHECKING:
    from collections.abc import Callable

    from kiln.config import RunConfig
    from kiln.data import TokenDataset
    from kiln.data.augment import AugmentedDataset
    from kiln.data.curriculum import Curriculum
    from kiln.rank import RankContext

__all__ = ["Given", "Parts", "build_parts"]


@dataclass
class Given:
    """Objects the caller passed instead of building them from the config (None: build)."""

    model: Any = None
    tokenizer: Any = None
    train_data: Any = None
    val_data: Any = None


@dataclass
class Parts:
    """Everything the loop runs on, as `build_parts` made it."""

    device: torch.device
    precision: Precision
    tokenizer: Any
    model: Any
    """The model (what is saved, evaluated and generated from)."""
    train_model: Any
    """What the training step runs: `model`, or its DDP wrapper on N ranks (under FSDP2 the
    model itself, sharded in place)."""
    train_data: TokenDataset
    val_data: TokenDataset | None
    batcher: Batcher
    regularizers: Regularizers
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    schedule: Callable[[int], float]
    total_steps: int
    guard: AnomalyGuard
    """Non-finite steps and loss spikes (`train.anomaly`)."""
    train_rows: list[Any] | None = None
    """The source rows, when the data was built from the config (generation eval needs them)."""
    val_rows: list[Any] | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    curriculum: Curriculum | None = None
    augmented: AugmentedDataset | None = None

    def sources(self, samples: list[int]) -> list[str] | None:
        """The source rows (file:line) of training samples, when each sample is one row
        (unpacked data built from the config); else None."""
        rows, data = self.train_rows, self.train_data
        if rows is None or data.blocks is not None or len(rows) != len(data):
            return None
        from kiln.data.sources import where

        return [where(rows[i], i) for i in samples]

    @property
    def pad_id(self) -> int:
        """Padding token id (0 when the tokenizer has none)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)


def build_parts(cfg: RunConfig, given: Given, rank: RankContext) -> Parts:
    """Build the run: device and precision, data and tokenizer, model (wrapped for training),
    optimizer and LR schedule. Seeds the global RNGs from `cfg.seed` (the caller restores them
    after the run)."""
    # A model and training data, from the config or given: one line naming what is missing.
    cfg.require_sources(
        model_given=given.model is not None, data_given=given.train_data is not None
    )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device, local_rank=rank.local_rank)
    precision = Precision(cfg.train.precision, device)
    seed_everything(cfg.seed)
    try:  # a bad name fails here, before minutes of data preparation
        get_collator(cfg.data.collator, cfg.task)
    except (ValueError, KeyError) as exc:
        raise KilnError(f"data.collator: {str(exc).strip(chr(34))}") from None
    data = _build_data(cfg, given)
    tokenizer, train_data, val_data, train_rows, val_rows, stats = data
    curriculum, augmented = build_schedule(cfg, train_data, train_rows, tokenizer)
    if not cfg.data.isolate_documents:  # packed documents then attend across each other
        train_data = train_data.without_documents()
        val_data = None if val_data is None else val_data.without_documents()
    global_batch = cfg.train.batch_size * rank.world_size
    if len(train_data) < global_batch:
        raise DataError(
            f"data.train: {len(train_data)} training examples, fewer than one global batch "
            f"(train.batch_size {cfg.train.batch_size} x {rank.world_size} ranks)"
        )
    model = given.model
    if model is None:
        from kiln.models import build_model

        seed_everything(cfg.seed)  # weight init independent of what ran before
        model = build_model(cfg, tokenizer)
    seed_everything(cfg.seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    batcher = Batcher(
        cfg.task,
        0 if pad is None else int(pad),
        collator=cfg.data.collator,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )
    model = prepare_for_training(model, cfg, device, batcher)
    train_model = _distribute(model, cfg, device, rank)
    optim = cfg.optim
    optimizer = build_optimizer(
        model,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        eps=optim.eps,
        fused=optim.fused,
    )
    steps = total_steps(cfg, len(train_data), curriculum, world_size=rank.world_size)
    if optim.warmup_for(steps) >= steps:  # (a warmup_ratio never takes every step)
        raise KilnError(
            f"optim.warmup_steps: must be < total steps ({steps}), got {optim.warmup_steps}; "
            "lower optim.warmup_steps or train for more steps (train.max_steps, "
            "train.num_epochs)"
        )
    schedule = schedule_for(optim, steps)
    return Parts(
        device=device,
        precision=precision,
        tokenizer=tokenizer,
        model=model,
        train_model=train_model,
        train_data=train_data,
        val_data=val_data,
        batcher=batcher,
        regularizers=build_regularizers(cfg),  # label smoothing, gradient noise
        optimizer=optimizer,
        params=[p for p in model.parameters() if p.requires_grad],
        schedule=schedule,
        total_steps=steps,
        guard=AnomalyGuard(cfg.train.anomaly, device),
        train_rows=train_rows,
        val_rows=val_rows,
        data_stats=stats,
        curriculum=curriculum,
        augmented=augmented,
    )


def _distribute(model: Any, cfg: RunConfig, device: torch.device, rank: RankContext) -> Any:
    """The model the training step runs on N ranks (`train.distributed.strategy`): DDP keeps a
    full replica per rank and all-reduces the gradients in backward; FSDP2 shards the model in
    place (each rank holds 1/N of every weight, gradient and optimizer state)."""
    if not rank.distributed:
        return model
    if cfg.train.distributed.strategy == "fsdp":
        from kiln.models.sharding import shard_model

        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _build_data(cfg: RunConfig, given: Given) -> tuple[Any, ...]:
    """(tokenizer, train, val, train_rows, val_rows, stats): from the config's files, or from
    the data the caller gave. Text rows given in Python go through the files' pipeline (checks,
    filters, templates, val split, tokenization and its cache); token ids are used as given
    (split by data.val_split when no val_data is given)."""
    from kiln.models import build_tokenizer

    tokenizer = given.tokenizer
    train_src, val_src = python_sources(cfg, given.train_data, given.val_data)
    if train_src is not None and not isinstance(train_src, PythonRows):
        if tokenizer is None:
            tokenizer = token_tokenizer(cfg, train_src, val_src)
        elif given.model is None:  # the model's embeddings are sized by the tokenizer
            check_token_range(tokenizer, train_src, val_src)
        train, val = token_splits(cfg, train_src, val_src)  # type: ignore[arg-type]
        return tokenizer, train, val, None, None, {}
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
    return tokenizer, train, val, train_rows, val_rows, stats.to_dict()
