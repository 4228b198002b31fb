"""Models and tokenizers: build or load them from a `RunConfig`."""

from __future__ import annotations

from kiln.models.build import build_model, count_parameters, model_flops_per_token
from kiln.models.generation import GenerationOptions, generate_texts
from kiln.models.lora import apply_lora
from kiln.models.tokenizer import (
    build_tokenizer,
    ensure_pad_token,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "GenerationOptions",
    "apply_lora",
    "build_model",
    "build_tokenizer",
    "count_parameters",
    "ensure_pad_token",
    "generate_texts",
    "load_tokenizer",
    "model_flops_per_token",
    "train_bpe_tokenizer",
]
