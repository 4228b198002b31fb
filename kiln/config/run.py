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
from pydantic import Field, ValidationError, field_validator, model_validator
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from kiln.config.base import ConfigError, Section, short_repr
from kiln.config.data import DataConfig
from kiln.config.eval import CheckpointConfig, EvalConfig
from kiln.config.model import LoraConfig, ModelConfig, TokenizerConfig
from kiln.config.tracking import LogConfig, NotifyConfig
from kiln.config.train import OptimConfig, TrainConfig

__all__ = [
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
        problems += _data_schedule_problems(self)
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


# Presets hold only training-behaviour knobs; the file's model and data always win.
# Metrics every validation has; anything else comes from generation eval (eval.generate).
_VAL_METRICS = ("val_loss", "val_ppl", "val_accuracy", "val_tokens")


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


_MAX_BYTES = 16 << 20  # of a config file; a real one is a few KiB
_MAX_DEPTH = 64  # nesting of mappings and lists; a real config uses under 10
_MAX_VALUES = 100_000  # values once aliases are expanded: stops "billion laughs" files


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and refuses documents
    that are too deep, too large once aliases are expanded, or that hold non-scalar keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # The composer recurses once per level: `[[[[...` would end in a RecursionError.
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {_MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expanded(node)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # int() refuses over 4300 digits and date() refuses 2024-02-30, with a bare ValueError.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            kind = node.tag.rpartition(":")[2]
            reason = str(exc).split(";")[0]
            problem = f"cannot read {short_repr(node.value)} as {kind}: {reason}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                problem = "a key must be a string, not a list or a mapping"
                raise ConstructorError(None, None, problem, key.start_mark)
        return super().construct_mapping(node, deep)


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a document that aliases expand past _MAX_VALUES values or _MAX_DEPTH levels, or
    into a cycle: loading shares an aliased value, but validation and dumps walk every copy."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded
    open_: set[int] = set()

    def walk(node: yaml.Node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in open_:
            raise ComposerError(
                None, None, "an alias refers to a value that holds it", node.start_mark
            )
        if key not in done:
            # Anchors come before their aliases, so a first visit is at the literal position
            # and this recursion is no deeper than the (already bounded) document.
            open_.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            values, levels = 1, 1
            for child in children:
                n, d = walk(child, level + 1)
                values, levels = values + n, max(levels, d + 1)
                if values > _MAX_VALUES:
                    problem = f"aliases expand it to more than {_MAX_VALUES} values"
                    raise ComposerError(None, None, problem, node.start_mark)
            open_.discard(key)
            done[key] = (values, levels)
        values, levels = done[key]
        if level + levels > _MAX_DEPTH + 1:
            problem = f"aliases nest it deeper than {_MAX_DEPTH} levels"
            raise ComposerError(None, None, problem, node.start_mark)
        return values, levels

    if root is not None:
        walk(root, 1)


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
            problems.append(f"{_cut(item)}: an override must look like section.key=value")
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


def _cut(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: a key or override echoed back may be arbitrarily long."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(_cut(str(p)) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif e["type"] == "bool_for_number":  # from Section: the message says it all
            lines.append(f"{loc}: {msg}")
        elif e["type"] == "invalid_key":  # YAML `1:`, `null:` or `true:` as a key
            parent = ".".join(_cut(str(p)) for p in e["loc"][:-1]) or "top level"
            lines.append(f"{parent}: key {_cut(str(e['loc'][-1]))} is not a string")
        elif e["type"] == "value_error" and not loc:
            lines.extend(msg.splitlines())
        elif e["type"] == "value_error":
            lines.extend(m if m.startswith(loc) else f"{loc}: {m}" for m in msg.splitlines())
        else:
            lines.append(f"{loc}: {msg[:1].lower() + msg[1:]} (got {short_repr(e['input'])})")
    return lines


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read config: {exc.strerror or exc}"], str(path)) from None
    if len(data) > _MAX_BYTES:
        raise ConfigError([f"larger than {_MAX_BYTES >> 20} MiB, not a config"], str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise ConfigError([f"not UTF-8 text ({bad}); save it as UTF-8"], str(path)) from None
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
        if not isinstance(preset, str) or preset not in PRESETS:
            names = ", ".join(PRESETS)
            raise ConfigError(
                [f"preset: unknown preset {short_repr(preset)} (expected one of {names})"], source
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
