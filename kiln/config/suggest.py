""" "Did you mean": the config key closest to an unknown one.

Used by the config error messages (`train.batchsize: unknown key; did you mean
train.batch_size?`) and by the CLI for dashed flags (`--epochs 5` -> `train.num_epochs=5`).
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from kiln.config.base import Section, union_members

__all__ = ["all_keys", "closest_key", "did_you_mean"]

ALIASES = {
    # HF TrainingArguments
    "learning_rate": "optim.lr",
    "epochs": "train.num_epochs",
    "n_epochs": "train.num_epochs",
    "num_train_epochs": "train.num_epochs",
    "batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "max_grad_norm": "train.grad_clip",
    "eval_steps": "eval.every_steps",
    "save_steps": "checkpoint.every_steps",
    "logging_steps": "log.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "lr_scheduler_type": "optim.scheduler",
    "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio",
    "weight_decay": "optim.weight_decay",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "resume_from_checkpoint": "checkpoint.resume",
    "dataloader_num_workers": "data.num_workers",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "optimizer": "optim.name",
    "optimizer_type": "optim.name",
    # the seed systems' TrainingConfig and YAML files
    "checkpoint_dir": "output_dir",  # checkpoints go to <output_dir>/checkpoints
    "experiment_name": "name",  # the run's name (runs/<name>, the trackers' run name)
    "run_name": "name",
    "model_name": "model.name_or_path",
    "total_steps": "train.max_steps",
    "scheduler_type": "optim.scheduler",
    "mixed_precision": "train.precision",
    "enable_mixed_precision": "train.precision",
    "use_bf16": "train.precision",
    "use_fp16": "train.precision",
    "use_flash_attention": "model.attn_implementation",
    "use_lora": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "early_stopping_patience": "eval.early_stopping.patience",
    "early_stopping_threshold": "eval.early_stopping.min_delta",
    "train_data": "data.train",
    "train_dataset": "data.train",
    "val_data": "data.val",
    "val_dataset": "data.val",
    "validated_data_dir": "data.train",
    "train_split": "data.val_split",  # the other side of the same split
    "max_input_length": "data.max_length",
    "seq_len": "data.max_length",
    "max_checkpoints": "checkpoint.keep_last",
    "use_wandb": "log.loggers",
    "wandb_project": "log.wandb.project",
    "wandb_run_name": "log.wandb.run_name",
    "discord_webhook": "notify.senders",
    "compute_bleu": "eval.generate.metrics",
    "compute_rouge": "eval.generate.metrics",
}
"""Names other trainers (HF TrainingArguments, the seed systems) use for kiln's keys. A flat
name (no section) is looked up here first: a close kiln name can mean something else
(`checkpoint_dir` is not `checkpoint`, `experiment_name` is not `log.mlflow.experiment`)."""

_FIRST = ("train.", "optim.", "data.", "model.")
"""Where a name several sections share most likely points (`batch_size` -> train's)."""


def _section_of(annotation: Any) -> type[Section] | None:
    """The one Section class a field holds (None: a value, a list, or a choice of sections)."""
    found = [a for a in union_members(annotation) if isinstance(a, type) and issubclass(a, Section)]
    return found[0] if len(found) == 1 else None


def _walk(cls: type[Section], prefix: str) -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        child = _section_of(field.annotation)
        if child is not None:
            keys += _walk(child, path + ".")
    return keys


@functools.cache
def all_keys() -> tuple[str, ...]:
    """Every dotted key of a RunConfig, sections included (`train`, `train.batch_size`)."""
    from kiln.config.run import RunConfig

    return tuple(_walk(RunConfig, ""))


def _siblings(parent: str) -> list[str]:
    """The keys directly under section `parent` ("" for the top level)."""
    depth = parent.count(".") + 1 if parent else 0
    return [
        k
        for k in all_keys()
        if k.count(".") == depth and (not parent or k.startswith(parent + "."))
    ]


def _close_sibling(parent: str, leaf: str, pool: list[str], cutoff: float) -> str | None:
    """The key under section `parent` whose name is closest to `leaf` (None: none that close)."""
    names = [k.rpartition(".")[2] for k in _siblings(parent)]
    near = difflib.get_close_matches(leaf, names, 1, cutoff=cutoff)
    key = (f"{parent}.{near[0]}" if parent else near[0]) if near else None
    return key if key in pool else None


def closest_key(path: str, *, leaves_only: bool = False) -> str | None:
    """The existing key `path` most likely meant, or None: a close name in the same section
    (`train.batchsize` -> `train.batch_size`), the same name in another section (`train.lr`
    -> `optim.lr`), or a close full path (`trian.max_steps` -> `train.max_steps`)."""
    keys = all_keys()
    sections = {k.rpartition(".")[0] for k in keys}
    pool = [k for k in keys if k not in sections] if leaves_only else list(keys)
    parent, _, leaf = path.rpartition(".")
    if leaf in ALIASES and not parent:
        return ALIASES[leaf]
    # Inside a section, a very close sibling (`log.mlflow.experiment_name` -> experiment) wins
    # over another trainer's name; a loose one (`data.max_input_length` -> max_target_length)
    # does not.
    near = _close_sibling(parent, leaf, pool, 0.8)
    if near is None and leaf in ALIASES:
        return ALIASES[leaf]
    if near is not None:
        return near
    # The same name in another section before a loosely similar one in this section
    # (`gradient_checkpointing` is model's, not `checkpoint`).
    same_name = [k for k in pool if k.rpartition(".")[2] == leaf and k != path]
    for k in sorted(same_name, key=lambda k: (k.count("."), not k.startswith(_FIRST))):
        return k
    near = _close_sibling(parent, leaf, pool, 0.6)
    if near is not None:
        return near
    near = difflib.get_close_matches(path, pool, 1, cutoff=0.8)
    if near:
        return near[0]
    # A name alone (a dashed flag): the closest leaf name anywhere, if only one section has it.
    by_leaf: dict[str, list[str]] = {}
    for k in pool:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    near = difflib.get_close_matches(leaf, list(by_leaf), 1, cutoff=0.75)
    return by_leaf[near[0]][0] if near and len(by_leaf[near[0]]) == 1 else None


def did_you_mean(path: str) -> str:
    """ "; did you mean KEY?" for an unknown key `path`, or "" when nothing is close."""
    if not all(part and not part.isdigit() for part in path.split(".")):
        return ""  # inside a list: the key paths above do not apply
    key = closest_key(path)
    return f"; did you mean {key}?" if key else ""
