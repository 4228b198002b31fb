"""RunConfig (every section, cross-section checks), presets, YAML I/O and dotted overrides.

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
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from kiln.config.base import (
    ALTERNATIVES,
    SECTION_PATHS,
    ConfigError,
    Section,
    drop_alternative,
    format_errors,
    set_dotted,
    short_repr,
    split_override,
)
from kiln.config.data import DataConfig
from kiln.config.eval import CheckpointConfig, EvalConfig, ExportConfig
from kiln.config.model import LoraConfig, ModelConfig, TokenizerConfig
from kiln.config.tracking import LogConfig, NotifyConfig
from kiln.config.train import DPO_METRICS, OptimConfig, TrainConfig
from kiln.config.yamlio import parse_override_value, read_yaml_file, read_yaml_text

__all__ = [
    "PREFERENCE_VAL_METRICS",
    "PRESETS",
    "RunConfig",
    "apply_overrides",
    "config_from_dict",
    "config_hash",
    "dump_yaml",
    "load_config",
    "parse_override_value",
    "save_config",
]


# One path component: runs/<name> stays inside runs/ (no separator, no `..`, not hidden).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A from-scratch model beyond this is a typo in a size (4 TB of fp32 weights), not a plan.
_MAX_PARAMETERS = 10**12


class RunConfig(Section):
    name: str = "run"
    """Run name (letters, digits, '.', '_', '-'); the default output_dir is runs/<name>."""
    output_dir: str | None = None
    """Run directory (config.yaml, metrics.jsonl, final/, summary.json)."""
    preset: Literal["fast", "baseline", "quality"] | None = None
    """Preset the file starts from; the file's own values win."""
    seed: int = Field(42, ge=0, le=2**63 - 1)
    """Seed for data order, initialization and dropout."""
    task: Literal["causal_lm", "seq2seq", "instruction", "chat", "preference"] = "causal_lm"
    """causal_lm: next-token prediction on text; instruction: prompt -> response with a causal
    LM, loss on the response only; chat: conversations (`messages`) rendered with the
    tokenizer's chat template, loss on the assistant turns (data.chat_loss); preference:
    {prompt, chosen, rejected} pairs for DPO (train.dpo); seq2seq: source -> target
    (encoder-decoder)."""
    model: ModelConfig = ModelConfig()
    """The model: pretrained by path, or an architecture built from scratch (neither: you pass
    your own model to the Trainer)."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """The tokenizer: loaded by path, or trained on the training text."""
    data: DataConfig = DataConfig()
    """Training and validation data."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
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
    export: ExportConfig = ExportConfig()
    """Export of the final model (ONNX, TorchScript, pt2) at the end of training."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any, info: ValidationInfo) -> Any:
        # Built from keys (constructor, YAML, CLI): the preset fills what they leave out. An
        # edit (replace, model_copy) keeps every value the config has instead.
        if not isinstance(data, dict) or (info.context or {}).get("edit"):
            return data
        preset = data.get("preset")
        if preset is None:
            return data
        if not isinstance(preset, str) or preset not in PRESETS:
            names = ", ".join(PRESETS)
            raise ValueError(
                f"preset: unknown preset {short_repr(preset)} (expected one of {names})"
            )
        return _deep_merge(PRESETS[preset], data)

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "must be one path component of letters, digits, '.', '_' or '-' "
                "(use output_dir to choose a place)"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        problems = []
        if self.model.arch is not None:
            params = self.model.approx_parameters(self.tokenizer.vocab_size)
            if params > _MAX_PARAMETERS:
                problems.append(
                    f"model: about {params:.1e} parameters from model.hidden_size, "
                    "model.num_layers, model.intermediate_size, model.max_position_embeddings "
                    f"and tokenizer.vocab_size; at most {_MAX_PARAMETERS:.0e}"
                )
        arch_task = {"gpt2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq"}
        model_task = "seq2seq" if self.task == "seq2seq" else "causal_lm"
        if self.model.arch and arch_task[self.model.arch] != model_task:
            problems.append(
                f"model.arch: {self.model.arch} is a {arch_task[self.model.arch]} model, "
                f"but task is {self.task}"
            )
        steps = self.train.max_steps
        if steps is not None and self.optim.warmup_for(steps) >= steps:  # (a ratio never)
            problems.append(
                f"optim.warmup_steps: must be < train.max_steps ({steps}), got "
                f"{self.optim.warmup_steps}; lower optim.warmup_steps or raise train.max_steps"
            )
        if (
            self.model.arch in ("gpt2", "llama")
            and self.data.max_length > self.model.max_position_embeddings
        ):
            problems.append(
                f"data.max_length: {self.data.max_length} exceeds "
                f"model.max_position_embeddings ({self.model.max_position_embeddings})"
            )
        problems += _chat_problems(self)
        problems += _data_schedule_problems(self)
        problems += _storage_problems(self)
        problems += _eval_problems(self)
        if self.train.precision == "fp16" and not self.train.device.startswith(("cuda", "auto")):
            problems.append(f"train.precision: fp16 needs a CUDA device, got {self.train.device}")
        if self.lora.qlora and self.model.name_or_path is None:
            problems.append("lora.qlora: quantizes a pretrained base; set model.name_or_path")
        if self.lora.qlora and not self.train.device.startswith(("cuda", "auto")):
            problems.append(
                f"lora.qlora: 4-bit QLoRA needs a CUDA device, got train.device {self.train.device}"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory: `output_dir`, or runs/<name>."""
        return Path(self.output_dir or f"runs/{self.name}")

    def _edited(self, raw: dict[str, Any]) -> RunConfig:
        new = super()._edited(raw)
        if new.preset is not None and new.preset != self.preset:
            # Every value is already explicit, so the preset would change nothing but its name.
            raise ConfigError(
                f"preset: a preset applies when a config is built; use "
                f"RunConfig(preset={new.preset!r}, ...) (an edit keeps every value)"
            )
        return new

    def validate(self) -> RunConfig:  # type: ignore[override]  # pydantic's is deprecated
        """Check the config again, as a whole, and return it (a config is validated when it is
        built and immutable afterwards, so this passes unless a value was changed in place:
        an item of a list, or an attribute set around `__setattr__`).

        Raises:
            ConfigError: one line per problem, each naming the full key path.
        """
        # A dump of every value (a default may have been changed too), not the sections
        # themselves: pydantic takes a section object as valid without looking inside.
        self._edited(self.model_dump(round_trip=True))
        return self

    def effective_batch_size(self, world_size: int = 1) -> int:
        """Sequences per optimizer step: batch_size x grad_accum_steps x `world_size` ranks."""
        return self.train.batch_size * self.train.grad_accum_steps * world_size

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens per optimizer step on `world_size` ranks: exact for packed causal_lm blocks,
        else an upper bound (batches are padded to their longest sequence)."""
        longest = self.data.max_length
        if self.task == "seq2seq":
            longest += self.data.max_target_length
        return self.effective_batch_size(world_size) * longest

    def to_yaml(self) -> str:
        """The config as YAML text, every key explicit (what `from_yaml` and `kiln train`
        read back to an equal config)."""
        return dump_yaml(self)

    @classmethod
    def from_yaml(cls, source: str | Path) -> RunConfig:
        """A config from a YAML file (a Path, or a str naming a file) or from YAML text (a str
        holding a newline, or starting with `key:` or `{`). The preset, if named, applies; the
        model and training data may be left out (pass them to the Trainer).

        Raises:
            ConfigError: one line per problem, each naming the key path (and file:line).
        """
        if isinstance(source, str) and _YAML_TEXT.match(source):
            return config_from_dict(read_yaml_text(source))
        return config_from_dict(read_yaml_file(Path(source)), str(source))

    def require_sources(self, *, model_given: bool = False, data_given: bool = False) -> None:
        """Check that the run has a model and training data: in the config, or given as
        objects (`model_given`, `data_given`).

        Raises:
            ConfigError: naming `model` and/or `data.train`.
        """
        problems = []
        if not model_given and self.model.name_or_path is None and self.model.arch is None:
            problems.append(
                "model: set model.name_or_path or model.arch, or pass a model to the Trainer"
            )
        if not data_given and self.data.train is None and self.data.sources is None:
            problems.append("data.train: set the training data, or pass train_data to the Trainer")
        if problems:
            raise ConfigError(problems)


# YAML text, not a file name: several lines, a flow mapping, or a first `key:`.
_YAML_TEXT = re.compile(r"\s*$|.*\n|\s*\{|\s*[\w.-]+\s*:(\s|$)")


def _section_paths(model: type[Section], prefix: str = "") -> dict[type, list[str]]:
    """Where each section class sits under `model` (a class may sit in several places)."""
    found: dict[type, list[str]] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            found.setdefault(ann, []).append(prefix + name)
            for cls, paths in _section_paths(ann, f"{prefix}{name}.").items():
                found.setdefault(cls, []).extend(paths)
    return found


SECTION_PATHS.update(
    {cls: paths[0] for cls, paths in _section_paths(RunConfig).items() if len(paths) == 1}
)


def _data_schedule_problems(cfg: RunConfig) -> list[str]:
    """Curriculum and augmentation settings that do not fit the task or the run length."""
    data, problems = cfg.data, []
    packed = cfg.task == "causal_lm" and data.packing
    if data.augment and packed:
        problems.append(
            "data.augment: augmented samples are re-tokenized as they are drawn, which packed "
            "blocks cannot be; set data.packing: false"
        )
    cur = data.curriculum
    if cur is None:
        return problems
    if data.loader_workers:
        problems.append(
            "data.loader_workers: not with data.curriculum (which samples may be drawn depends "
            "on the step, so batches cannot be built ahead); set data.loader_workers: 0"
        )
    if packed and not data.isolate_documents:
        problems.append(
            "data.curriculum: with data.packing it needs data.isolate_documents: true "
            "(to know which documents each block holds)"
        )
    if cur.by == "step" and (cfg.train.max_steps is None or cfg.train.num_epochs is not None):
        problems.append(
            "data.curriculum.by: step needs train.max_steps, without train.num_epochs (the "
            "length of an epoch then changes with the step)"
        )
    return problems


def _chat_problems(cfg: RunConfig) -> list[str]:
    """What tasks chat and preference need: a chat template, the matching objective, and the
    parts of kiln that read conversations and pairs."""
    problems = []
    objective = cfg.train.objective
    if cfg.task == "preference" and objective not in (None, "dpo"):
        problems.append("train.objective: task preference trains with dpo")
    if objective == "dpo" and cfg.task != "preference":
        problems.append(f"train.objective: dpo needs task preference, got task {cfg.task}")
    if cfg.task == "preference":
        problems += _unsupported(cfg, "task preference")
        if cfg.train.label_smoothing:
            problems.append("train.label_smoothing: a token loss option; task preference is DPO")
    if cfg.task != "chat":
        return problems
    pretrained = cfg.tokenizer.name_or_path is not None or cfg.model.name_or_path is not None
    if not pretrained and cfg.tokenizer.chat_template is None:
        problems.append(
            "tokenizer.chat_template: task chat with a tokenizer trained from scratch (it has "
            "no chat template); set chatml, llama3 or a Jinja template"
        )
    return problems + _unsupported(cfg, "task chat")


def _unsupported(cfg: RunConfig, what: str) -> list[str]:
    """The data and eval options that read text rows, not conversations or pairs (yet)."""
    problems = []
    if cfg.eval.generate.num_samples > 0 and what != "task chat":
        problems.append(f"eval.generate: generation metrics are not built for {what}")
    if cfg.data.storage == "shards":
        problems.append(f"data.storage: shards does not read {what} rows yet")
    if cfg.data.augment:
        problems.append(f"data.augment: not supported with {what}")
    if cfg.data.curriculum is not None:
        problems.append(f"data.curriculum: not supported with {what} yet")
    return problems


def _storage_problems(cfg: RunConfig) -> list[str]:
    """What training from token shards (`data.storage: shards`) cannot do (yet)."""
    data = cfg.data
    if data.storage != "shards":
        if data.sources is not None:  # a mixture is a set of shard sets
            return ["data.sources: a mixture needs data.storage: shards"]
        return []
    why = "not supported with data.storage: shards"
    problems = []
    if data.curriculum is not None and data.sources is not None:
        problems.append("data.curriculum: not supported with data.sources (a mixture) yet")
    if data.augment:
        problems.append(f"data.augment: {why} (it re-renders rows in memory)")
    if data.cache_dir is None:
        problems.append("data.cache_dir: null, but data.storage: shards writes the shards there")
    if cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None:
        problems.append(
            "tokenizer.name_or_path: not set, but data.storage: shards needs a pretrained "
            "tokenizer (training one needs the whole corpus in memory)"
        )
    if cfg.eval.generate.num_samples > 0 and data.val is None:
        problems.append(
            "eval.generate: with data.storage: shards, generation metrics need data.val "
            "(the held-out documents are tokens, not rows)"
        )
    return problems


# Presets hold only training-behaviour knobs; the file's model and data always win.
# Metrics every validation has; anything else comes from generation eval (eval.generate).
_VAL_METRICS = ("val_loss", "val_ppl", "val_accuracy", "val_tokens")
PREFERENCE_VAL_METRICS = ("val_loss", "val_pairs", *(f"val_{m}" for m in DPO_METRICS))
"""What a validation of preference pairs logs (`kiln.engine.preference`)."""


def _eval_problems(cfg: RunConfig) -> list[str]:
    """Early stopping, keep_best and final=best need validation, and generation metrics."""
    problems = []
    has_val = cfg.data.val is not None or cfg.data.val_split > 0
    generates = cfg.eval.generate.num_samples > 0
    wants = []
    if cfg.eval.early_stopping.enabled:
        wants.append(("eval.early_stopping", cfg.eval.early_stopping.metric))
    if cfg.checkpoint.final == "best" or cfg.checkpoint.keep_best:
        what = "checkpoint.final" if cfg.checkpoint.final == "best" else "checkpoint.keep_best"
        wants.append((what, cfg.checkpoint.metric))
    for key, metric in wants:
        if not has_val:
            problems.append(f"{key}: needs validation data (set data.val or data.val_split > 0)")
        elif cfg.task == "preference":
            if metric not in PREFERENCE_VAL_METRICS:
                names = ", ".join(PREFERENCE_VAL_METRICS)
                problems.append(f"{key}: task preference validates {names}; got {metric}")
        elif metric not in _VAL_METRICS and not generates:
            problems.append(
                f"{key}: metric {metric} comes from generation eval; set "
                "eval.generate.num_samples > 0 (or use val_loss, val_ppl, val_accuracy)"
            )
    return problems


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


def _deep_merge(base: dict[str, Any], top: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
            other = ALTERNATIVES.get(where, ".").rpartition(".")[2]
            if other not in top:  # both in one layer: validation reports it
                drop_alternative(out, where, value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b.c=value` overrides to a raw config dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        split = split_override(item)
        problem = split if isinstance(split, str) else None
        if problem is None:
            problem = set_dotted(out, split[0], parse_override_value(split[1]))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return out


def config_from_dict(raw: dict[str, Any], source: str | None = None) -> RunConfig:
    """Validate a raw dict (preset applied first) into a RunConfig, or raise ConfigError.

    Missing sections take their defaults (no model, no training data); `load_config` is the
    stricter reader of a file that must describe a whole run."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err), source) from None


def _incomplete(raw: dict[str, Any]) -> list[str]:
    """What a file run on its own lacks: a model, training data, a length (a preset's keys
    count). The Python API leaves them out when the Trainer is given a model and data."""
    preset = raw.get("preset")
    if isinstance(preset, str) and preset in PRESETS:
        raw = _deep_merge(PRESETS[preset], raw)
    problems = [
        f"{key}: required key is missing" for key in ("model", "data", "train") if key not in raw
    ]
    model, data, train = (raw.get(key) for key in ("model", "data", "train"))
    if isinstance(model, dict) and model.get("name_or_path") is None and model.get("arch") is None:
        problems.append("model: set exactly one of model.name_or_path or model.arch")
    if isinstance(data, dict) and data.get("train") is None and data.get("sources") is None:
        problems.append("data.train: required key is missing")
    if (
        isinstance(train, dict)
        and train.get("max_steps") is None
        and train.get("num_epochs") is None
    ):
        problems.append("train: set train.max_steps or train.num_epochs")
    return problems


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    complete: bool = True,
) -> RunConfig:
    """Load a run config from a YAML file (or a dict), apply overrides, and validate it.

    Args:
        path: YAML file. Relative data paths in it are kept as written (relative to the cwd).
        overrides: dotted `section.key=value` strings, applied after the file.
        data: a raw config dict, instead of a file.
        complete: require what a run from the file alone needs (the CLI's case): the model,
            data.train and train.max_steps or train.num_epochs. False: defaults fill them, as
            in `RunConfig(...)` and `RunConfig.from_yaml`.

    Raises:
        ConfigError: with one line per problem, each naming the key path.
    """
    if (path is None) == (data is None):
        raise TypeError("pass exactly one of path or data")
    raw = read_yaml_file(Path(path)) if path is not None else copy.deepcopy(data)
    source = str(path) if path is not None else None
    if "sweep" in raw:
        raise ConfigError(["sweep: this is a sweep file: run it with kiln sweep FILE"], source)
    raw = apply_overrides(raw, overrides or [])
    problems = _incomplete(raw) if complete else []
    try:
        cfg = config_from_dict(raw, source)
    except ConfigError as err:
        raise ConfigError(problems + err.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


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
