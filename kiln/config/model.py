"""Model, tokenizer and LoRA sections: what is trained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.config.base import MAX_COUNT, MAX_TOKENS, Section

__all__ = ["LoraConfig", "ModelConfig", "TokenizerConfig"]

_MAX_WIDTH = 65_536  # of the residual stream, and so of a LoRA rank


class ModelConfig(Section):
    name_or_path: str | None = None
    """Pretrained model: a local directory or a hub id. Mutually exclusive with `arch`; with
    neither, the Trainer is given the model."""
    arch: Literal["gpt2", "llama", "t5"] | None = None
    """Build a fresh model of this architecture from the size fields below (from scratch)."""
    hidden_size: int = Field(256, gt=0, le=_MAX_WIDTH)
    """Width of the residual stream (from scratch)."""
    num_layers: int = Field(4, gt=0, le=1024)
    """Number of transformer blocks (from scratch; for t5, encoder and decoder each)."""
    num_heads: int = Field(4, gt=0, le=1024)
    """Attention heads per layer (from scratch); must divide hidden_size."""
    intermediate_size: int | None = Field(None, gt=0, le=MAX_TOKENS)
    """MLP width (from scratch); default 4 x hidden_size (8/3 x for llama)."""
    max_position_embeddings: int = Field(1024, gt=0, le=MAX_TOKENS)
    """Longest sequence the model can see (from scratch; gpt2/llama)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the model (from scratch)."""
    tie_word_embeddings: bool = True
    """Share input embedding and output projection weights (from scratch)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the stored weights; mixed precision is `train.precision`."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers; flash_attention_2 needs CUDA and the flash-attn
    package, and falls back to sdpa (with a warning) without them."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (non-reentrant; works with
    LoRA and frozen weights)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        # Neither is a model given to the Trainer as an object (RunConfig.require_sources).
        if self.name_or_path is not None and self.arch is not None:
            raise ValueError("set exactly one of model.name_or_path or model.arch, not both")
        if self.arch is not None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads: must divide model.hidden_size ({self.hidden_size}), "
                f"got {self.num_heads}"
            )
        return self

    def approx_parameters(self, vocab_size: int) -> int:
        """Rough parameter count of a from-scratch model (embeddings + blocks), to refuse
        absurd sizes before anything is allocated; not the exact count of any architecture."""
        h = self.hidden_size
        mlp = self.intermediate_size or 4 * h
        per_block = 4 * h * h + 3 * h * mlp  # q, k, v, o + up to three MLP matrices
        blocks = self.num_layers * (2 if self.arch == "t5" else 1)  # t5: encoder and decoder
        embeddings = (vocab_size + self.max_position_embeddings) * h
        return embeddings + blocks * per_block


class TokenizerConfig(Section):
    name_or_path: str | None = None
    """Tokenizer path or hub id; default: model.name_or_path, or train one when from scratch."""
    vocab_size: int = Field(4096, ge=260, le=MAX_TOKENS)
    """Vocabulary size of a tokenizer trained on the training text (byte-level BPE)."""
    min_frequency: int = Field(2, ge=1, le=MAX_COUNT)
    """Minimum pair frequency for a BPE merge when training a tokenizer."""
    chat_template: str | None = None
    """task chat: the chat template, a built-in name (chatml, llama3) or a Jinja string; it
    replaces the tokenizer's own. A built-in's markers (e.g. <|im_start|>) are added to the
    vocabulary as special tokens when missing. null: the tokenizer's own template."""


class LoraConfig(Section):
    enabled: bool = False
    """Train low-rank adapters instead of all weights."""
    r: int = Field(8, gt=0, le=_MAX_WIDTH)
    """Adapter rank."""
    alpha: float = Field(16.0, gt=0.0)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (suffixes such as q_proj, c_attn, q), or all-linear (every linear
    layer but the output head)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full next to the adapters and saved with them (e.g. lm_head)."""
    merge_on_finish: bool = False
    """Also write final/merged/: the adapters merged into the base weights, loadable by
    transformers alone (as `kiln merge RUN_DIR OUT` does later)."""
    qlora: bool = False
    """QLoRA: load the pretrained base in 4-bit NF4 with bitsandbytes (CUDA only; the `qlora`
    extra). Adapters train in higher precision; compute runs in bfloat16 (float16 when
    model.dtype is float16)."""

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.qlora and not self.enabled:
            raise ValueError("lora.qlora: needs lora.enabled: true")
        if self.merge_on_finish and not self.enabled:
            raise ValueError("lora.merge_on_finish: needs lora.enabled: true")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules: name at least one module, or all-linear")
        return self
