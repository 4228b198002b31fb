"""Wrap a built model for training: LoRA, device, TF32, torch.compile (with few shapes)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from kiln.config import RunConfig

__all__ = ["compile_model", "prepare_for_training"]

logger = logging.getLogger("kiln")


def compile_model(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """Compile `model`'s forward in place (`nn.Module.compile`) and return it.

    In place, not `torch.compile(model)`: the module keeps its class, parameter names and
    methods (`save_pretrained`, `generate`, PEFT's adapters), so checkpoints and final/ are
    the same as without compile. `mode`: default, reduce-overhead (CUDA graphs), max-autotune,
    max-autotune-no-cudagraphs.
    """
    model.compile(mode=None if mode == "default" else mode)
    logger.info("compiling the model (torch.compile, mode %s); the first steps are slow", mode)
    return model


def prepare_for_training(model: Any, cfg: RunConfig, device: torch.device, batcher: Any) -> Any:
    """The model, ready for the loop: LoRA-wrapped if asked (also a model passed in as an
    object), on `device`, in train mode, TF32 per `train.tf32`, compiled per `train.compile`.

    With compile, the batches of `batcher` are padded to multiples of
    `train.compile_pad_multiple` (unless `data.pad_to_multiple_of` is set): each new input
    length would make torch.compile trace again (and after a few, fall back to slower dynamic
    shapes). Packed causal blocks all have one length already.
    """
    from kiln.device import place_model, set_tf32
    from kiln.models.lora import apply_lora, is_peft_model
    from kiln.models.quiet import peft_quietly

    if cfg.lora.enabled and not is_peft_model(model):
        with peft_quietly():
            model = apply_lora(model, cfg)
    place_model(model, device)
    model.train()
    set_tf32(cfg.train.tf32, device)
    if cfg.train.compile:
        compile_model(model, cfg.train.compile_mode)
        if not batcher.pad_to_multiple_of:
            batcher.pad_to_multiple_of = cfg.train.compile_pad_multiple
    return model
