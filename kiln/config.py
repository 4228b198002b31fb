"""Typed run configuration: pydantic models per section, YAML I/O, dotted overrides, presets.

A run is described by one YAML file. `load_config` reads it, lays it over a preset (when the file
names one), applies `key=value` overrides, validates everything at once and returns a frozen
`RunConfig`. Every problem is reported as one line naming its key path (`ConfigError.problems`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import KilnError

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "InstructionTemplate",
    "LogConfig",
    "LoraConfig",
    "ModelConfig",
    "NotifyConfig",
    "OptimConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "dump_yaml",
    "load_config",
    "parse_override_value",
    "save_config",
]


class ConfigError(KilnError):
    """A config that cannot be used; `problems` holds one line per problem, each naming a key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    name_or_path: str | None = None
    """Pretrained model: a local directory or a hub id. Mutually exclusive with `arch`."""
    arch: Literal["gpt2", "llama", "t5"] | None = None
    """Build a fresh model of this architecture from the size fields below (from scratch)."""
    hidden_size: int = Field(256, gt=0)
    """Width of the residual stream (from scratch)."""
    num_layers: int = Field(4, gt=0)
    """Number of transformer blocks (from scratch; for t5, encoder and decoder each)."""
    num_heads: int = Field(4, gt=0)
    """Attention heads per layer (from scratch); must divide hidden_size."""
    intermediate_size: int | None = Field(None, gt=0)
    """MLP width (from scratch); default 4 x hidden_size (8/3 x for llama)."""
    max_position_embeddings: int = Field(1024, gt=0)
    """Longest sequence the model can see (from scratch; gpt2/llama)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the model (from scratch)."""
    tie_word_embeddings: bool = True
    """Share input embedding and output projection weights (from scratch)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the stored weights; mixed precision is `train.precision`."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError("set exactly one of model.name_or_path or model.arch")
        if self.arch is not None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads: must divide model.hidden_size ({self.hidden_size}), "
                f"got {self.num_heads}"
            )
        return self


class TokenizerConfig(_Section):
    name_or_path: str | None = None
    """Tokenizer path or hub id; default: model.name_or_path, or train one when from scratch."""
    vocab_size: int = Field(4096, ge=260)
    """Vocabulary size of a tokenizer trained on the training text (byte-level BPE)."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair frequency for a BPE merge when training a tokenizer."""


class InstructionTemplate(_Section):
    prompt: str
    """Prompt format string over the row's fields (list fields joined by newlines)."""
    response: str
    """Response format string; only its tokens carry loss."""


class DataConfig(_Section):
    train: str | list[str]
    """Training data: a file (JSONL, JSON, CSV, Parquet, text), a glob, a list of them, a
    `datasets` dataset saved to disk, or `hf:<hub name>`."""
    val: str | list[str] | None = None
    """Validation data (same forms as `train`); when unset, `val_split` of the training rows."""
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "hf"] = "auto"
    """File format; auto picks it from each file's extension (.jsonl .json .csv .parquet .txt)."""
    hf_split: str = "train"
    """Split to read from a `datasets` dataset (hub name or saved DatasetDict)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops with file:line (error), or is skipped and counted (skip)."""
    val_split: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of training rows held out for validation when `data.val` is unset."""
    text_field: str = "text"
    """Row field holding the text (causal_lm)."""
    source_template: str = "{source}"
    """seq2seq input, a format string over the row's fields (list fields joined by newlines)."""
    target_template: str = "{target}"
    """seq2seq target, a format string over the row's fields (list fields joined by newlines)."""
    prompt_template: str = "{prompt}"
    """instruction: the prompt, a format string over the row's fields (no loss on its tokens)."""
    response_template: str = "{response}"
    """instruction: the response, a format string over the row's fields (the loss is on it)."""
    templates: list[InstructionTemplate] = Field(default_factory=list)
    """instruction: several prompt/response templates, one picked per sample (seeded): mixed
    sample formats. Overrides prompt_template/response_template when set."""
    max_length: int = Field(256, gt=1)
    """causal_lm: tokens per packed block (sequence length); seq2seq/instruction: max input
    tokens (instruction: prompt + response)."""
    max_target_length: int = Field(256, gt=1)
    """seq2seq: max target tokens."""
    truncation: bool = True
    """Cut sequences longer than the limits; false makes such a sequence an error."""
    packing: bool = True
    """causal_lm: concatenate documents (EOS-separated) into blocks of max_length tokens."""
    isolate_documents: bool = True
    """With packing: documents in a block do not attend to each other (position ids restart
    per document), where the model supports it."""
    pad_to_multiple_of: int | None = Field(None, gt=0)
    """Pad each batch's length up to a multiple of this (tensor-core and compile friendly)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); the order stays seeded."""
    collator: str = "auto"
    """Collator by registry name; auto picks the task's default."""
    cache_dir: str | None = ".kiln_cache"
    """Cache tokenized datasets here, keyed by data, tokenizer and settings; null disables."""
    num_workers: int = Field(0, ge=0)
    """Worker processes for tokenization (0: in the main process)."""
    min_quality_score: float | None = Field(None, ge=0.0, le=1.0)
    """Drop rows whose `quality_field` is below this score."""
    quality_field: str = "quality_score"
    """Row field holding the quality score used by `min_quality_score`."""
    dedup: bool = True
    """Drop exact duplicates (by rendered text), keeping the first."""
    min_chars: int | None = Field(None, ge=0)
    """Drop rows whose rendered text is shorter than this many characters."""
    max_chars: int | None = Field(None, gt=0)
    """Drop rows whose rendered text is longer than this many characters."""
    max_samples: int | None = Field(None, gt=0)
    """Use at most this many training rows (after filtering), for quick experiments."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.min_chars, self.max_chars
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"data.min_chars: must be <= data.max_chars ({hi}), got {lo}")
        return self


class OptimConfig(_Section):
    name: Literal["adamw"] = "adamw"
    """Optimizer (AdamW; fused when the device supports it)."""
    lr: float = Field(3e-4, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """Decoupled weight decay, applied to matrices only (not biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam epsilon."""
    fused: bool | None = None
    """Fused AdamW kernel: null picks the fastest supported one for the device."""
    scheduler: Literal["constant", "linear", "cosine", "cosine_restarts"] = "cosine"
    """LR schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the decaying schedules, as a fraction of `lr`."""
    num_cycles: int = Field(1, ge=1)
    """cosine_restarts: number of cosine cycles over the run."""


class TrainConfig(_Section):
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train; with num_epochs too, whichever ends first."""
    num_epochs: float | None = Field(None, gt=0)
    """Passes over the training data (may be fractional)."""
    batch_size: int = Field(8, gt=0)
    """Sequences per micro-batch."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step; the loss is token-weighted over the whole window."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision: fp32, bf16 (CUDA with bf16 support, or CPU), fp16 (CUDA only)."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value; null disables clipping."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), or cpu, cuda, cuda:N, mps."""
    num_threads: int | None = Field(None, gt=0)
    """CPU threads for torch; null keeps torch's default."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("set train.max_steps or train.num_epochs")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(
                f"train.device: expected auto, cpu, mps, cuda or cuda:N, got {self.device!r}"
            )
        return self


class EvalConfig(_Section):
    every_steps: int | None = Field(None, gt=0)
    """Validate every N optimizer steps (and always at the end); null: only at the end."""
    max_batches: int | None = Field(None, gt=0)
    """Bound each validation to this many batches."""
    batch_size: int | None = Field(None, gt=0)
    """Validation batch size; default train.batch_size."""
    sample_prompt: str | None = None
    """Prompt to generate a sample from at the end of training (printed, and in summary.json)."""
    sample_max_new_tokens: int = Field(200, gt=0)
    """Tokens to generate for the end-of-training sample."""


class CheckpointConfig(_Section):
    every_steps: int | None = Field(None, gt=0)
    """Save a checkpoint every N optimizer steps; null: no periodic checkpoints."""
    keep_last: int = Field(3, ge=1)
    """Keep this many most recent checkpoints."""
    keep_best: int = Field(0, ge=0)
    """Also keep this many best checkpoints by `metric`."""
    metric: str = "val_loss"
    """Metric that ranks checkpoints for keep_best."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or larger `metric` is better."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue from the newest complete checkpoint in the run directory, if any."""


class LoraConfig(_Section):
    enabled: bool = False
    """Train low-rank adapters instead of all weights."""
    r: int = Field(8, gt=0)
    """Adapter rank."""
    alpha: float = Field(16.0, gt=0.0)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear."""


class LogConfig(_Section):
    every_steps: int = Field(10, gt=0)
    """Log train loss, LR and throughput every N optimizer steps (the only host syncs)."""
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    """Progress display: a live bar on a TTY (auto), a plain line per log step, or nothing."""


class NotifyConfig(_Section):
    on: list[Literal["start", "end", "failure"]] = Field(default_factory=list)
    """Events to notify about (senders land with the notifications issue)."""


class RunConfig(_Section):
    name: str = "run"
    """Run name; the default output_dir is runs/<name>."""
    output_dir: str | None = None
    """Run directory (config.yaml, metrics.jsonl, final/, summary.json)."""
    preset: Literal["fast", "baseline", "quality"] | None = None
    """Preset the file starts from; the file's own values win."""
    seed: int = 42
    """Seed for data order, initialization and dropout."""
    task: Literal["causal_lm", "seq2seq", "instruction"] = "causal_lm"
    """causal_lm: next-token prediction on text; instruction: prompt -> response with a causal
    LM, loss on the response only; seq2seq: source -> target (encoder-decoder)."""
    model: ModelConfig
    """The model: pretrained by path, or an architecture built from scratch."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """The tokenizer: loaded by path, or trained on the training text."""
    data: DataConfig
    """Training and validation data."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    train: TrainConfig
    """Length, batching, precision and device of training."""
    eval: EvalConfig = EvalConfig()
    """Validation cadence and the end-of-run sample."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint cadence, rotation and the metric that ranks them."""
    lora: LoraConfig = LoraConfig()
    """Low-rank adapters (PEFT)."""
    log: LogConfig = LogConfig()
    """Logging cadence and progress display."""
    notify: NotifyConfig = NotifyConfig()
    """Notifications about the run."""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        problems = []
        arch_task = {"gpt2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq"}
        model_task = "causal_lm" if self.task == "instruction" else self.task
        if self.model.arch and arch_task[self.model.arch] != model_task:
            problems.append(
                f"model.arch: {self.model.arch} is a {arch_task[self.model.arch]} model, "
                f"but task is {self.task}"
            )
        steps = self.train.max_steps
        if steps is not None and self.optim.warmup_steps >= steps:
            problems.append(
                f"optim.warmup_steps: must be < train.max_steps ({steps}), "
                f"got {self.optim.warmup_steps}"
            )
        if (
            self.model.arch in ("gpt2", "llama")
            and self.data.max_length > self.model.max_position_embeddings
        ):
            problems.append(
                f"data.max_length: {self.data.max_length} exceeds "
                f"model.max_position_embeddings ({self.model.max_position_embeddings})"
            )
        if self.train.precision == "fp16" and not self.train.device.startswith(("cuda", "auto")):
            problems.append(f"train.precision: fp16 needs a CUDA device, got {self.train.device}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory: `output_dir`, or runs/<name>."""
        return Path(self.output_dir or f"runs/{self.name}")


# Presets hold only training-behaviour knobs; the file's model and data always win.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": {"max_steps": 100, "grad_accum_steps": 1},
        "eval": {"every_steps": 50, "max_batches": 10},
        "log": {"every_steps": 10},
    },
    "baseline": {
        "optim": {"lr": 5e-4, "scheduler": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1},
        "train": {"max_steps": 1000, "grad_clip": 1.0},
        "eval": {"every_steps": 200, "max_batches": 50},
        "log": {"every_steps": 20},
    },
    "quality": {
        "optim": {
            "lr": 3e-4,
            "scheduler": "cosine",
            "warmup_steps": 200,
            "min_lr_ratio": 0.05,
            "weight_decay": 0.1,
        },
        "train": {"max_steps": 5000, "grad_clip": 1.0},
        "eval": {"every_steps": 250},
        "log": {"every_steps": 50},
    },
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_FLOAT_RE = r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(_FLOAT_RE, re.X), list("-+0123456789.")
)


def parse_override_value(text: str) -> Any:
    """Parse the value of a `key=value` override: numbers, bools, null, [lists], or a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b.c=value` overrides to a raw config dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item}: an override must look like section.key=value")
            continue
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = parse_override_value(text)
    if problems:
        raise ConfigError(problems)
    return out


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif e["type"] == "value_error" and not loc:
            lines.extend(msg.splitlines())
        elif e["type"] == "value_error":
            lines.extend(m if m.startswith(loc) else f"{loc}: {m}" for m in msg.splitlines())
        else:
            lines.append(f"{loc}: {msg[0].lower() + msg[1:]} (got {e['input']!r})")
    return lines


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read config: {exc.strerror}"], str(path)) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"invalid YAML: {problem}"], where) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], str(path))
    return raw


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a raw dict (preset applied first) into a RunConfig, or raise ConfigError."""
    preset = raw.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            names = ", ".join(PRESETS)
            raise ConfigError(
                [f"preset: unknown preset {preset!r} (expected one of {names})"], source
            )
        raw = _deep_merge(PRESETS[preset], raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
) -> RunConfig:
    """Load a run config from a YAML file (or a dict), apply overrides, and validate it.

    Args:
        path: YAML file. Relative data paths in it are kept as written (relative to the cwd).
        overrides: dotted `section.key=value` strings, applied after the file.
        data: a raw config dict, instead of a file.

    Raises:
        ConfigError: with one line per problem, each naming the key path.
    """
    if (path is None) == (data is None):
        raise TypeError("pass exactly one of path or data")
    raw = _read_yaml(Path(path)) if path is not None else copy.deepcopy(data)
    source = str(path) if path is not None else None
    return config_from_dict(apply_overrides(raw, overrides or []), source)


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text, every field explicit (what ran)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config to `path` as YAML."""
    Path(path).write_text(dump_yaml(cfg))


def config_hash(cfg: RunConfig) -> str:
    """A stable sha256 of the resolved config (canonical JSON)."""
    canon = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
