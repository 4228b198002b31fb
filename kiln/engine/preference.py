"""Preference optimization (`task: preference`, DPO): the loss of a batch of pairs against a
frozen reference, the metrics TRL logs, and validation.

A batch is (2B, T): B chosen sequences, then their B rejected ones, labels -100 off the
completions (`kiln.data.collate.collate_preference`). Each sequence's log-probability is the
sum of its completion tokens' log-probabilities (after the causal shift), under the policy and
under the reference: the model as training found it, a frozen copy (`DPO.reference`), or, with
LoRA, the policy with its adapters disabled (no second copy of the weights). With
r = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))):

- sigmoid (DPO): -log sigmoid(r);
- hinge: max(0, 1 - r);
- ipo: ((d_c / n_c - d_r / n_r) - 1 / (2 beta))^2 with d the log-ratio and n the completion's
  tokens (TRL's length-normalized IPO).

The loop weights the window by pairs (`target_tokens`), so the step's loss is the mean over its
pairs, as TRL's. The metrics carry TRL's names: rewards/chosen, rewards/rejected (beta x the
log-ratio, mean over pairs), rewards/accuracies (chosen's reward above rejected's),
rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from kiln.config.train import DPO_METRICS as METRICS
from kiln.engine.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from kiln.config.train import DPOConfig
    from kiln.device import Precision
    from kiln.rank import RankContext

__all__ = ["DPO", "METRICS", "sequence_logps"]


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each sequence's completion-token log-probabilities (N,), in fp32; each
    sequence's completion tokens (N,))."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (N, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def _base(model: Any) -> Any:
    return model.module if isinstance(model, DistributedDataParallel) else model


class DPO:
    """The DPO objective of a run: its reference and its pending metrics.

    Args:
        cfg: `train.dpo`.
        model: the policy as built, before LoRA, placement or compile.
        precision: the run's device and autocast.
        adapters: the policy trains LoRA adapters: the reference is the policy with its
            adapters disabled (no copy); else a frozen copy of `model`, on the device.
    """

    def __init__(
        self, cfg: DPOConfig, model: Any, precision: Precision, *, adapters: bool = False
    ) -> None:
        from kiln.device import place_model

        self.beta, self.loss_type = cfg.beta, cfg.loss_type
        self.precision = precision
        self.reference: Any = None
        if not adapters:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
            place_model(self.reference, precision.device)
        self._pending: list[torch.Tensor] = []

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, batch)[0]
            base = _base(model)
            was = base.training
            base.eval()  # as TRL's reference: no dropout
            try:
                with base.disable_adapter():
                    return sequence_logps(base, batch)[0]
            finally:
                base.train(was)

    def pair_losses(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each pair's loss (B,), the metrics' sums over the pairs (len(METRICS) + 1,):
        the last entry counts the pairs)."""
        logps, tokens = sequence_logps(model, batch)
        ref = self._reference_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * (chosen_ratio - rejected_ratio))
        else:  # ipo, normalized by each completion's tokens (as TRL)
            n_chosen, n_rejected = tokens.chunk(2)
            delta = chosen_ratio / n_chosen.clamp_min(1) - rejected_ratio / n_rejected.clamp_min(1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        with torch.no_grad():
            r_chosen, r_rejected = self.beta * chosen_ratio, self.beta * rejected_ratio
            sums = torch.stack(
                [
                    r_chosen.sum(),
                    r_rejected.sum(),
                    (r_chosen > r_rejected).float().sum(),
                    (r_chosen - r_rejected).sum(),
                    chosen.sum(),
                    rejected.sum(),
                    torch.tensor(float(len(chosen)), device=chosen.device),
                ]
            )
        return losses, sums

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training micro-batch's summed pair losses; its metrics wait for the log."""
        losses, sums = self.pair_losses(model, batch)
        self._pending.append(sums)
        return losses.sum()

    def flush(self, rank: RankContext) -> dict[str, float]:
        """The metrics since the last log, as means over every pair of every rank (one
        all-reduce, at the log step)."""
        if not self._pending:
            return {}
        sums = rank.all_reduce_sum(torch.stack(self._pending).sum(0), "preference metrics")
        self._pending.clear()
        values = sums.tolist()
        n = max(values[-1], 1.0)
        return {name: v / n for name, v in zip(METRICS, values, strict=False)}

    def evaluate(
        self,
        model: Any,
        dataset: Any,
        batcher: Any,
        *,
        batch_size: int,
        max_batches: int | None = None,
        rank: RankContext | None = None,
        sharded: bool = False,
    ) -> dict[str, float]:
        """val_loss (the mean pair loss) and the metrics, `val_`-prefixed, over `dataset` in
        order; on N ranks each takes every N-th batch and the sums are all-reduced (a
        `sharded` model's ranks run as many forwards each, the spare ones discarded)."""
        was = model.training
        model.eval()
        device = self.precision.device
        total = torch.zeros(len(METRICS) + 2, device=device, dtype=torch.float64)
        world = rank.world_size if rank is not None and rank.distributed else 1
        end = len(dataset)
        if max_batches is not None:
            end = min(end, max_batches * batch_size * world)
        starts = list(range(0, end, batch_size))
        mine: list[int | None] = list(starts)
        if rank is not None and rank.distributed:
            mine = starts[rank.rank :: rank.world_size]
            if sharded:  # each forward is a collective: every rank runs as many
                mine += [None] * (-(-len(starts) // rank.world_size) - len(mine))
        try:
            for start in mine:
                first = starts[0] if start is None else start
                batch = batcher(dataset, torch.arange(first, min(first + batch_size, end)))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with torch.no_grad(), self.precision.autocast():
                    losses, sums = self.pair_losses(model, batch)
                if start is not None:
                    total += torch.cat([losses.sum().view(1), sums]).double()
        finally:
            model.train(was)
        if rank is not None and rank.distributed:
            total = rank.all_reduce_sum(total, "preference validation")
        values = total.tolist()
        n = values[-1]
        if n == 0:
            return {}
        out = {"val_loss": values[0] / n, "val_pairs": n}
        out.update({f"val_{name}": v / n for name, v in zip(METRICS, values[1:], strict=False)})
        return out
