"""Models: build a fresh gpt2/llama/t5 from the config's sizes, or load a pretrained one.

`build_model` returns a transformers `PreTrainedModel` whose head fits `cfg.task`
(causal LM or encoder-decoder), with the attention kernel, dtype and activation checkpointing
the config asks for, an embedding table that covers every tokenizer id, and a generation config
that knows the tokenizer's pad/eos ids.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import is_flash_attn_2_available

from kiln.config import RunConfig
from kiln.errors import ModelError, first_line
from kiln.models.tokenizer import looks_local
from kiln.registry import require_extra

__all__ = [
    "LOAD_ERRORS",
    "VOCAB_MULTIPLE",
    "build_model",
    "count_parameters",
    "load_failure",
    "model_flops_per_token",
]

logger = logging.getLogger("kiln")

VOCAB_MULTIPLE = 64
"""Fresh models get a vocabulary padded up to a multiple of this: matmuls with a vocab dimension
that is a multiple of 64 hit faster GPU kernels (nanoGPT's 50257 -> 50304). The extra rows are
never produced by the tokenizer; training pushes their logits down."""

LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # missing or unreadable files; transformers' "not a valid JSON file"
    ValueError,  # json.JSONDecodeError, unknown model_type, bad config values
    KeyError,  # a JSON file without a key it must have (tokenizer.json's added_tokens)
    RuntimeError,  # torch size mismatches ("You set ignore_mismatched_sizes to False")
    SafetensorError,  # a truncated or overwritten .safetensors (not an OSError)
    StrictDataclassError,  # a config.json field of the wrong type (huggingface_hub)
)
"""What loading a model, config, tokenizer or weights raises on a missing, truncated or corrupt
file. Caught around the load calls themselves (never around kiln's own code) and turned into a
one-line `ModelError`/`KilnError` with `load_failure`."""


def load_failure(exc: BaseException) -> str:
    """The first line of a loading error, for a one-line message (the rest is a report table)."""
    if isinstance(exc, KeyError):  # str(KeyError("x")) is just "'x'"
        return f"missing key {exc}"
    if isinstance(exc, StrictDataclassError):  # "Validation error for field 'x':\n  <why>"
        return " ".join(line.strip() for line in str(exc).strip().splitlines())
    return first_line(exc)


_TASK_AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "instruction": AutoModelForCausalLM,
    "chat": AutoModelForCausalLM,
    "preference": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
}
_TASK_NAMES = {
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "instruction": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "chat": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "preference": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq": MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
}
_TASK_WORDS = {
    "causal_lm": "a causal LM",
    "instruction": "a causal LM",
    "chat": "a causal LM",
    "preference": "a causal LM",
    "seq2seq": "a seq2seq (encoder-decoder) model",
}


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def _scratch_config(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of a fresh `cfg.model.arch` model sized by `cfg.model`."""
    m = cfg.model
    vocab_size = _round_up(len(tokenizer), VOCAB_MULTIPLE)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    if m.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=m.hidden_size,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.intermediate_size,  # None: GPT-2's 4 x hidden
            n_positions=m.max_position_embeddings,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=m.tie_word_embeddings,
        )
    if m.arch == "llama":
        # LLaMA's SwiGLU MLP has 3 matrices, so 8/3 x hidden keeps the parameter count of a
        # 4 x hidden GELU MLP; rounded up to a multiple of 64 as LLaMA does.
        intermediate = m.intermediate_size or _round_up(round(8 * m.hidden_size / 3), 64)
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_heads,
            max_position_embeddings=m.max_position_embeddings,
            attention_dropout=m.dropout,
            rms_norm_eps=1e-6,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=m.tie_word_embeddings,
        )
    # t5: FLAN-T5 / T5 v1.1 layout (gated-GELU MLP). T5 has relative position buckets, so
    # max_position_embeddings does not apply.
    if not m.tie_word_embeddings:
        # transformers 5 always ties T5's embeddings; False would only drop the d_model**-0.5
        # output scaling that tied weights need.
        logger.warning("model.tie_word_embeddings: t5 always ties its embeddings; ignoring false")
    return T5Config(
        vocab_size=vocab_size,
        d_model=m.hidden_size,
        d_kv=m.hidden_size // m.num_heads,
        d_ff=m.intermediate_size or 4 * m.hidden_size,
        num_layers=m.num_layers,
        num_decoder_layers=m.num_layers,
        num_heads=m.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=m.dropout,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,  # T5's convention: the decoder starts from pad
    )


def _attn_implementation(cfg: RunConfig, model_class: type[PreTrainedModel]) -> str:
    """The attention kernel to ask for: the configured one, or a supported fallback (warned)."""
    wanted = cfg.model.attn_implementation
    name = model_class.__name__
    if wanted == "flash_attention_2":
        if not getattr(model_class, "_supports_flash_attn", False):
            logger.warning(
                "model.attn_implementation: %s has no flash_attention_2; using sdpa", name
            )
            wanted = "sdpa"
        elif not (torch.cuda.is_available() and is_flash_attn_2_available()):
            logger.warning(
                "model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn "
                "package; using sdpa"
            )
            wanted = "sdpa"
    if wanted == "sdpa" and not getattr(model_class, "_supports_sdpa", False):
        logger.warning("model.attn_implementation: %s has no sdpa attention; using eager", name)
        wanted = "eager"
    return wanted


def _load_pretrained_config(cfg: RunConfig) -> tuple[str, PretrainedConfig]:
    """(where to load from, AutoConfig) of `model.name_or_path`, checked against `cfg.task`."""
    path = cfg.model.name_or_path
    if path is None:
        raise ValueError("model.name_or_path is not set")
    local = Path(path).expanduser()
    if looks_local(path) and not local.is_dir():
        raise ModelError(f"model.name_or_path: cannot load {path!r}: no such directory")
    source = str(local) if local.is_dir() else path
    try:
        config = AutoConfig.from_pretrained(source)
    except (*LOAD_ERRORS, ImportError) as exc:
        if local.is_dir():
            reason = load_failure(exc)
        else:
            reason = "not a local directory and not reachable on the hub"
        raise ModelError(f"model.name_or_path: cannot load {path!r}: {reason}") from None
    model_type = config.model_type
    if model_type not in _TASK_NAMES[cfg.task]:
        other = "causal_lm" if cfg.task == "seq2seq" else "seq2seq"
        hint = f"; set task: {other}" if model_type in _TASK_NAMES[other] else ""
        raise ModelError(f"model.name_or_path: {model_type} is not {_TASK_WORDS[cfg.task]}{hint}")
    return source, config


def _qlora_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """from_pretrained arguments that load the base in 4-bit NF4 (QLoRA) on the run's GPU."""
    from kiln.device import resolve_device

    device = resolve_device(cfg.train.device)
    if device.type != "cuda":
        raise ModelError(
            f"lora.qlora: 4-bit QLoRA needs a CUDA GPU (bitsandbytes); this run trains on "
            f"{device.type}: set lora.qlora: false"
        )
    require_extra("bitsandbytes", "qlora", feature="lora.qlora: 4-bit QLoRA")
    from transformers import BitsAndBytesConfig

    compute = torch.float16 if cfg.model.dtype == "float16" else torch.bfloat16
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
        "device_map": {"": index},  # bitsandbytes quantizes while loading onto the GPU
    }


def _embedding_rows(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[0]


def build_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Build the run's model: fresh from `model.arch`, or loaded from `model.name_or_path`.

    A fresh model is initialized from `cfg.seed` (without disturbing the global RNG), with a
    vocabulary of len(tokenizer) rounded up to a multiple of `VOCAB_MULTIPLE`. A pretrained
    model whose embeddings are smaller than the tokenizer (a pad token was added) is resized.

    Args:
        cfg: the run config (model section and task).
        tokenizer: the run's tokenizer, with a pad token (see `build_tokenizer`).

    Raises:
        ModelError: a one-line message when the pretrained model cannot be loaded or does not
            fit the task.
        MissingExtra: `lora.qlora` without bitsandbytes (the `qlora` extra).
    """
    auto_cls = _TASK_AUTO[cfg.task]
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.arch is not None:
        config = _scratch_config(cfg, tokenizer)
        attn = _attn_implementation(cfg, auto_cls._model_mapping[type(config)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        source, config = _load_pretrained_config(cfg)
        attn = _attn_implementation(cfg, auto_cls._model_mapping[type(config)])
        quantize = _qlora_kwargs(cfg) if cfg.lora.enabled and cfg.lora.qlora else {}
        try:
            model = auto_cls.from_pretrained(
                source, config=config, dtype=dtype, attn_implementation=attn, **quantize
            )
        except LOAD_ERRORS as exc:
            raise ModelError(
                f"model.name_or_path: cannot load {cfg.model.name_or_path!r}: {load_failure(exc)}"
            ) from None
        rows = _embedding_rows(model)
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
            logger.info(
                "resized token embeddings from %d to %d rows to cover the tokenizer (%d tokens)",
                rows,
                _embedding_rows(model),
                len(tokenizer),
            )

    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and is torch's recommended mode.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # before transformers 5.23, under the name it has deprecated since
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # A KV cache is useless in training and transformers warns that it conflicts. T5's
        # encoder/decoder stacks hold their own copies of the config, hence every module's.
        for module in model.modules():
            if isinstance(getattr(module, "config", None), PretrainedConfig):
                module.config.use_cache = False
    if cfg.task != "seq2seq" and getattr(model, "loss_type", None) is None:
        # Classes like GPT2LMHeadModel match no loss name and warn before falling back to this.
        model.loss_type = "ForCausalLM"
    _set_generation_ids(model, tokenizer)
    if cfg.lora.enabled:
        from kiln.models.lora import apply_lora
        from kiln.models.quiet import peft_quietly

        with peft_quietly():
            model = apply_lora(model, cfg)
    return model


def _set_generation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the generation config at the tokenizer's ids so `generate` needs no arguments."""
    gen = model.generation_config
    # Only overwrite with ids the tokenizer has: a pretrained model's own ids are kept otherwise.
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if model.config.is_encoder_decoder:
        start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            start = gen.decoder_start_token_id
        gen.decoder_start_token_id = start if start is not None else tokenizer.pad_token_id
    elif tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights are counted once."""
    params = list(model.parameters())  # parameters() already skips shared tensors
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _flops_params(model: PreTrainedModel) -> int:
    """Parameters that cost matmul FLOPs: all but lookup tables, the output projection included."""
    total, _ = count_parameters(model)
    lookups = {
        id(p): p.numel()
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    out = model.get_output_embeddings()
    # A tied output projection shares the input embedding's tensor but still does a (d x V)
    # matmul per token, so it counts.
    if out is not None and id(out.weight) in lookups:
        del lookups[id(out.weight)]
    return total - sum(lookups.values())


def model_flops_per_token(
    model_or_config: PreTrainedModel | PretrainedConfig, seq_len: int
) -> float:
    """Training FLOPs per token, the PaLM estimate (Chowdhery et al. 2022, appendix B).

    6N + 12·L·H·Q·T: 6N for the forward (2N) and backward (4N) matmuls with the weights, and
    12·L·H·Q·T for the attention scores and weighted sums over a sequence of T tokens, with L
    layers, H heads of width Q. N counts every weight that takes part in a matmul: lookup tables
    (token, position and T5 relative-bias embeddings) are left out, the output projection is kept
    even when tied to the token embedding (it is a real d x V matmul), as in nanoGPT's MFU.
    For encoder-decoder models L is encoder plus decoder layers and T is used for both stacks
    (cross-attention is not counted separately), which is rough but fine for MFU.
    Rematerialization (activation checkpointing) is not counted: MFU, not HFU.

    Args:
        model_or_config: a model, or a config (a model is built on the meta device to count).
        seq_len: tokens per training sequence (T).
    """
    if isinstance(model_or_config, PreTrainedModel):
        model, config = model_or_config, model_or_config.config
    else:
        config = model_or_config
        auto_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto_cls.from_config(config)
    layers = config.num_hidden_layers
    if config.is_encoder_decoder:
        layers += getattr(config, "num_decoder_layers", None) or config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * _flops_params(model) + 12.0 * layers * heads * head_dim * seq_len
