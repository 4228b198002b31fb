"""Token-weighted language-model loss.

The loss of an accumulation window is the sum of the token losses of all its micro-batches
divided by the number of target tokens in the whole window, so `grad_accum_steps=k, batch=b`
gives the same gradients as `1, k*b` even when micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "IGNORE_INDEX",
    "LossFn",
    "count_targets",
    "forward_loss_sum",
    "target_tokens",
    "token_loss_sum",
]

IGNORE_INDEX = -100


def target_tokens(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Target tokens a batch contributes to the loss, as a scalar tensor on the batch's device
    (no host sync); for preference pairs, the pairs."""
    labels = batch["labels"]
    if task == "preference":  # weighted by pairs: (2B, T) holds B chosen, then B rejected
        return torch.tensor(labels.shape[0] // 2, device=labels.device)
    if task != "seq2seq":
        labels = labels[:, 1:]  # the first token of a sequence is never predicted
    return (labels != IGNORE_INDEX).sum()


def sum_in_order(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """((a + b) + c) ...: the sum a loop of `+=` gives, without a zeros tensor to start
    from (one op for two values, none for one: the step's window is often one micro-batch)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """`target_tokens` as an int (host-side: call on CPU tensors)."""
    return int(target_tokens(batch, task))


def _model_inputs(model: Any, batch: dict[str, torch.Tensor], task: str) -> dict[str, Any]:
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    for key in ("attention_mask", "position_ids"):  # position_ids: packed documents
        if key in batch:
            inputs[key] = batch[key]
    if task == "seq2seq":
        # Teacher forcing from the labels; the loss is computed here, not by the model.
        base = model.module if isinstance(model, DistributedDataParallel) else model
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(
            labels=batch["labels"]
        )
    return inputs


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (N, V), labels (N,)) -> fp32 sum of the token losses over labels != -100."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy summed over target tokens, in fp32 (the default `LossFn`)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def forward_loss_sum(
    model: Any, batch: dict[str, torch.Tensor], task: str, *, loss_fn: LossFn | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the model and return (sum of token losses, logits, aligned labels).

    The sum is in fp32 whatever the autocast dtype; `logits` is (B, T, V) and `labels` is
    (B, T) aligned with it (shifted for causal LMs). `loss_fn` replaces the plain
    cross-entropy (e.g. `kiln.engine.regularize.LabelSmoothing` in training).
    """
    logits = model(**_model_inputs(model, batch, task), use_cache=False).logits  # (B, T, V)
    labels = batch["labels"]
    if task != "seq2seq":  # causal_lm, instruction: predict the next token
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss_sum = (loss_fn or token_loss_sum)(logits.flatten(0, 1), labels.flatten())
    return loss_sum, logits, labels
