"""Models and tokenizers: build or load them from a `RunConfig`.

Loaded lazily: `import kiln.models.generation` (the engine's generation eval) does not load
transformers' modeling code, the tokenizer trainer or peft; each name below imports its module
on first use.
"""

from __future__ import annotations

from kiln.registry import lazy_exports

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

_LAZY = {
    "GenerationOptions": "kiln.models.generation",
    "apply_lora": "kiln.models.lora",
    "build_model": "kiln.models.build",
    "build_tokenizer": "kiln.models.tokenizer",
    "count_parameters": "kiln.models.build",
    "ensure_pad_token": "kiln.models.tokenizer",
    "generate_texts": "kiln.models.generation",
    "load_tokenizer": "kiln.models.tokenizer",
    "model_flops_per_token": "kiln.models.build",
    "train_bpe_tokenizer": "kiln.models.tokenizer",
}

__getattr__ = lazy_exports(__name__, _LAZY)
