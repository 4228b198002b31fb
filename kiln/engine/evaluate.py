"""Validation: streaming, token-weighted loss, perplexity and token accuracy (`evaluate`), with
generation eval when due (`validate`, a run's validation); the best checkpoint's weights for
`checkpoint.final: best`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.data.collate import Batcher
from kiln.device import Precision
from kiln.engine.loss import IGNORE_INDEX, count_targets, forward_loss_sum
from kiln.metrics.display import perplexity
from kiln.rank import RankContext

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.engine.generate_eval import GenerationEval
    from kiln.engine.parts import Parts

__all__ = ["evaluate", "restore_best", "validate"]

log = logging.getLogger("kiln")


@torch.no_grad()
def evaluate(
    model: Any,
    dataset: Any,
    *,
    task: str,
    batch_size: int,
    pad_id: int,
    precision: Precision,
    max_batches: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    batcher: Batcher | None = None,
    rank: RankContext | None = None,
    sharded: bool = False,
) -> dict[str, float] | None:
    """Mean token loss, perplexity and next-token accuracy over `dataset`, in order.

    val_loss = (sum of the token losses of every target token) / (number of target tokens),
    over all batches: token-weighted, so a batch of short sequences counts as much as its
    tokens, not as a batch. val_ppl = exp(val_loss) (capped at exp(50)); val_accuracy = the
    fraction of target tokens whose argmax prediction is right; val_tokens = the count.
    Sums are accumulated on the device and read once at the end; no logits are kept between
    batches, so memory does not grow with the validation set and there is a single host sync.
    Returns None when `should_stop` turned true between batches (a stop request: the caller
    checkpoints instead).
    `batcher` builds the batches as training does (collator, pad_to_multiple_of, packed
    documents); by default, the task's collator with `pad_id`. On N ranks (`rank`) each rank
    evaluates every N-th batch and the sums are all-reduced: every rank returns the same (a
    `sharded` model's ranks run the same number of forwards, the spare ones discarded).
    `batch_size` is per rank, as train.batch_size; `max_batches` counts global batches
    (batch_size x N samples), so the same global batch validates the same first
    `max_batches x batch_size x N` samples, and the same val_loss, at any world size.
    A mixture's validation data (`data.sources`) also gives `val_loss/<source>`: the same
    token-weighted mean over the target tokens of that source's examples alone.
    """
    if batcher is None:
        batcher = Batcher(task, pad_id)
    was_training = model.training
    model.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    tokens = 0
    groups = _SourceLosses.of(dataset, device)
    world = rank.world_size if rank is not None and rank.distributed else 1
    end = len(dataset)
    if max_batches is not None:  # counted in global batches: a sample bound, whatever N is
        end = min(end, max_batches * batch_size * world)
    starts = list(range(0, end, batch_size))
    mine: list[int | None] = list(starts)
    if rank is not None and rank.distributed:
        mine = starts[rank.rank :: rank.world_size]  # every N-th batch
        if sharded:  # each forward is a collective: every rank runs as many
            mine += [None] * (-(-len(starts) // rank.world_size) - len(mine))
    try:
        for start in mine:
            if should_stop is not None and should_stop():
                return None
            first = starts[0] if start is None else start  # None: a forward to keep in step
            batch = batcher(dataset, torch.arange(first, min(first + batch_size, end)))
            targets = count_targets(batch, task)  # on the CPU copy: no device sync
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with precision.autocast():
                batch_loss, logits, labels = forward_loss_sum(model, batch, task)
            if start is None:
                continue
            tokens += targets
            mask = labels != IGNORE_INDEX
            loss_sum += batch_loss.double()
            if groups is not None:
                groups.add(logits, labels, first)
            correct += ((logits.argmax(-1) == labels) & mask).sum()
            del logits, labels, mask, batch_loss  # free before the next forward: one batch live
    finally:
        model.train(was_training)
    if rank is not None and rank.distributed:
        sums = torch.stack([loss_sum, correct.double(), torch.tensor(float(tokens), device=device)])
        if groups is not None:
            sums = torch.cat([sums, groups.sums()])
        sums = rank.all_reduce_sum(sums, "validation sums")
        loss_sum, correct, tokens = sums[0], sums[1], int(sums[2].item())
        if groups is not None:
            groups.reduced(sums[3:])
    if tokens == 0:
        return {}
    loss = loss_sum.item() / tokens
    return {
        "val_loss": loss,
        "val_ppl": perplexity(loss),
        "val_accuracy": correct.item() / tokens,
        "val_tokens": float(tokens),
        **(groups.metrics() if groups is not None else {}),
    }


class _SourceLosses:
    """The loss sums and target tokens of each source of a mixture's validation data."""

    def __init__(self, source: Any, names: list[str], device: torch.device) -> None:
        self.source, self.names = torch.as_tensor(source).long(), names
        self.loss = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.tokens = torch.zeros(len(names), device=device, dtype=torch.int64)

    @classmethod
    def of(cls, dataset: Any, device: torch.device) -> _SourceLosses | None:
        """For a `kiln.data.shards.Mixture` (its `source` and `names`), else None."""
        names, source = getattr(dataset, "names", None), getattr(dataset, "source", None)
        if names is None or source is None:
            return None
        import numpy as np

        return cls(np.asarray(source, dtype=np.int64), list(names), device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, first: int) -> None:
        """Add the batch of examples first, first + 1, ... (its aligned logits and labels)."""
        rows = labels.shape[0]
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(rows, -1)
        where = self.source[first : first + rows].to(per_token.device)
        self.loss.index_add_(0, where, per_token.sum(1).double())
        self.tokens.index_add_(0, where, (labels != IGNORE_INDEX).sum(1))

    def sums(self) -> torch.Tensor:
        return torch.cat([self.loss, self.tokens.double()])

    def reduced(self, sums: torch.Tensor) -> None:
        """Take the sums all ranks added (`sums` as `sums()` lays them out)."""
        k = len(self.names)
        self.loss, self.tokens = sums[:k], sums[k:].long()

    def metrics(self) -> dict[str, float]:
        tokens = self.tokens.tolist()
        losses = self.loss.tolist()
        return {
            f"val_loss/{name}": loss / n
            for name, loss, n in zip(self.names, losses, tokens, strict=True)
            if n > 0
        }


def validate(
    cfg: RunConfig,
    parts: Parts,
    rank: RankContext,
    *,
    step: int,
    last: Callable[[], bool],
    should_stop: Callable[[], bool],
    generation: GenerationEval | None = None,
    samples_file: Path | None = None,
) -> dict[str, float] | None:
    """A validation of the run at `step`: `evaluate` over its validation data, then generation
    eval when `generation` is due (`last()`: this is the run's last validation), its samples
    written to `samples_file` by the main rank. None when `should_stop` cut it short; {} for no
    target tokens. Every rank returns the same."""
    batch_size = cfg.eval.batch_size or cfg.train.batch_size
    if parts.objective is not None:  # preference pairs: the DPO loss and rewards
        return parts.objective.evaluate(
            parts.model,
            parts.val_data,
            parts.batcher,
            batch_size=batch_size,
            max_batches=cfg.eval.max_batches,
            rank=rank,
            sharded=parts.parallel.sharded,
        )
    metrics = evaluate(
        parts.model,
        parts.val_data,
        task=cfg.task,
        batch_size=batch_size,
        pad_id=parts.pad_id,
        precision=parts.precision,
        batcher=parts.batcher,
        max_batches=cfg.eval.max_batches,
        should_stop=should_stop,
        rank=rank,
        sharded=parts.parallel.sharded,
    )
    if not metrics or generation is None:
        return metrics
    if not generation.due_for(parts.val_rows, step, last=last()):
        return metrics
    generated = None
    synced = parts.parallel.synced  # FSDP: all ranks run it
    if rank.is_main or synced:  # (DDP: the other ranks wait for its metrics)
        generated = generation.run(
            parts.model,
            parts.tokenizer,
            parts.val_rows,  # type: ignore[arg-type]
            samples_file=samples_file if rank.is_main else None,
            should_stop=should_stop,
            synced=synced,
        )
    generated = rank.broadcast(generated, "generation eval scores")
    return None if generated is None else {**metrics, **generated}


def restore_best(model: Any, checkpoints: Any, metric: str, step: int) -> dict[str, Any]:
    """Load the weights of the best complete checkpoint (by `metric`) into `model`, for
    final/; returns what final/ then holds ({"weights", "step", metric}).

    Falls back to the last weights (with a warning) when no checkpoint has the metric.
    """
    from kiln.engine.resume import load_weights

    best = checkpoints.best()
    if best is None:
        log.warning(
            "checkpoint.final=best: no checkpoint has %s; final/ holds the last weights", metric
        )
        return {"weights": "last", "step": step}
    load_weights(best.path, model, None, device=torch.device("cpu"))  # collective if sharded
    log.info(
        "final/ holds the best checkpoint: step %d (%s %.6g)",
        best.step,
        metric,
        best.metrics[metric],
    )
    return {"weights": "best", "step": best.step, metric: best.metrics[metric]}
