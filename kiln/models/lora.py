"""LoRA adapters through PEFT: only the adapter weights train; final/ holds the adapter.

`apply_lora` wraps a model per `cfg.lora` (QLoRA: after preparing its 4-bit base for training).
`base_fingerprint` summarizes the frozen base weights, so a loader that rebuilds a from-scratch
base (seeded init) can prove it got the same weights the adapter was trained on.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import RunConfig
from kiln.errors import KilnError, first_line
from kiln.registry import require_extra

__all__ = ["apply_lora", "base_fingerprint", "import_peft", "is_peft_model"]


def import_peft() -> Any:
    """The `peft` module, or a one-line `MissingExtra` naming the extra to install."""
    return require_extra("peft", "lora", feature="lora.enabled: LoRA")


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a PEFT model (adapters on a frozen base)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    """Wrap `model` in a PEFT LoRA model per `cfg.lora`; base weights are frozen.

    Only the adapters (and `lora.modules_to_save`) require grad. With `lora.qlora` the 4-bit
    base is first prepared for training (norms in fp32, input grads for checkpointing).

    Raises:
        MissingExtra: peft is not installed (the `lora` extra).
        KilnError: a module name is unknown.
    """
    peft = import_peft()
    lora = cfg.lora
    if lora.qlora:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type="SEQ_2_SEQ_LM" if cfg.task == "seq2seq" else "CAUSAL_LM",
        # GPT-2 stores its linear layers transposed (Conv1D); PEFT must know or it warns.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        reason = first_line(exc)
        key = "lora.modules_to_save" if "modules_to_save" in reason else "lora.target_modules"
        raise KilnError(f"{key}: {reason}") from None


def _is_adapter_weight(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


@torch.no_grad()
def base_fingerprint(model: torch.nn.Module, *, ranks: Any = None) -> float:
    """Sum of squares (float64) of the base model's weights, each tensor once.

    For a PEFT model, the adapters and the trained copies of `modules_to_save` are left out,
    so the PEFT model and the plain base it was built on give the same number (up to the
    order of the float64 additions). A model sharded over `ranks` (a `kiln.rank.RankContext`;
    FSDP2): each rank sums its shards and the sums are all-reduced (collective).
    """
    from torch.distributed.tensor import DTensor

    parts = [
        (p.to_local() if isinstance(p, DTensor) else p).detach().double().square().sum()
        for name, p in model.named_parameters()
        if not _is_adapter_weight(name)
    ]
    if ranks is None:
        return sum(float(x) for x in parts)
    total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    return float(ranks.all_reduce_sum(total, "LoRA base fingerprint"))
