"""What a run is built from, built at once (`build_parts`), top to bottom: device and
precision, the data (asked of `kiln.data.assemble`, ready), the model, how the ranks share it
(`Parallelism`), regularizers, optimizer and LR schedule, from the config and what the caller
gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kiln.data.assemble import Given, assemble_data
from kiln.data.collate import Batcher
from kiln.device import Precision, resolve_device
from kiln.engine.anomaly import AnomalyGuard
from kiln.engine.loss import forward_loss_sum
from kiln.engine.parallel import Parallelism
from kiln.engine.regularize import Regularizers, build_regularizers
from kiln.errors import KilnError
from kiln.models.wrap import prepare_for_training
from kiln.optim import build_optimizer, schedule_for
from kiln.process import seed_everything

if TYPE_CHECKING:
    from collections.abc import Callable

    from kiln.config import RunConfig
    from kiln.data import TokenDataset
    from kiln.data.augment import AugmentedDataset
    from kiln.data.curriculum import Curriculum
    from kiln.engine.preference import DPO
    from kiln.rank import RankContext

__all__ = ["Given", "Parts", "build_parts", "total_steps"]


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
    parallel: Parallelism
    """How the ranks share the training (strategy, world size, mesh): asked, never the model."""
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
    objective: DPO | None = None
    """task preference: the DPO objective and its reference; None: the token loss."""

    def step_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The training micro-batch's summed loss: the objective's, else the token loss
        (with the regularizers' loss function)."""
        if self.objective is not None:
            return self.objective.loss_sum(self.train_model, batch)
        loss_fn = self.regularizers.loss_fn
        return forward_loss_sum(self.train_model, batch, task, loss_fn=loss_fn)[0]

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
    data = assemble_data(cfg, given, world_size=rank.world_size, rank=rank)  # ready for the loop
    model = given.model
    if model is None:
        from kiln.models import build_model

        seed_everything(cfg.seed)  # weight init independent of what ran before
        model = build_model(cfg, data.tokenizer)
    seed_everything(cfg.seed)
    pad = getattr(data.tokenizer, "pad_token_id", None)
    batcher = Batcher(
        cfg.task,
        0 if pad is None else int(pad),
        collator=cfg.data.collator,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )
    objective = None
    if cfg.task == "preference":  # its reference: the model as built (LoRA: adapters off)
        from kiln.engine.preference import DPO

        objective = DPO(cfg.train.dpo, model, precision, adapters=cfg.lora.enabled)
    model = prepare_for_training(model, cfg, device, batcher)
    parallel = Parallelism.build(rank, cfg.train.distributed.strategy, device)
    train_model = parallel.wrap(model, device)
    optim = cfg.optim
    optimizer = build_optimizer(
        model,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        eps=optim.eps,
        fused=optim.fused,
    )
    steps = total_steps(cfg, len(data.train), data.curriculum, world_size=rank.world_size)
    if optim.warmup_for(steps) >= steps:  # (a warmup_ratio never takes every step)
        raise KilnError(
            f"optim.warmup_steps: must be < total steps ({steps}), got {optim.warmup_steps}; "
            "lower optim.warmup_steps or train for more steps (train.max_steps, "
            "train.num_epochs)"
        )
    return Parts(
        device=device,
        precision=precision,
        tokenizer=data.tokenizer,
        model=model,
        train_model=train_model,
        parallel=parallel,
        train_data=data.train,
        val_data=data.val,
        batcher=batcher,
        regularizers=build_regularizers(cfg),  # label smoothing, gradient noise
        optimizer=optimizer,
        params=[p for p in model.parameters() if p.requires_grad],
        schedule=schedule_for(optim, steps),
        total_steps=steps,
        guard=AnomalyGuard(cfg.train.anomaly, device),
        train_rows=data.train_rows,
        val_rows=data.val_rows,
        data_stats=data.stats,
        curriculum=data.curriculum,
        augmented=data.augmented,
        objective=objective,
    )


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
