"""LoRA adapters through PEFT: only the adapter weights train; final/ holds the adapter."""

from __future__ import annotations

from typing import Any

from kiln.config import RunConfig
from kiln.errors import KilnError

__all__ = ["apply_lora"]


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    """Wrap `model` in a PEFT LoRA model per `cfg.lora`; base weights are frozen.

    Raises:
        KilnError: when peft is not installed (the `lora` extra) or a target module is unknown.
    """
    try:
        import peft
    except ImportError:
        raise KilnError(
            "lora.enabled: LoRA needs peft; install the extra: pip install 'kiln[lora]'"
        ) from None
    task_type = "SEQ_2_SEQ_LM" if cfg.task == "seq2seq" else "CAUSAL_LM"
    lora = cfg.lora
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        # GPT-2 stores its linear layers transposed (Conv1D); PEFT must know or it warns.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise KilnError(f"lora.target_modules: {reason}") from None
