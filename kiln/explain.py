"""`kiln config explain`: the resolved config with each key's meaning, and what it implies."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel

from kiln.config import RunConfig, config_hash

__all__ = ["annotated_yaml", "explain", "explain_facts"]


def _scalar(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a double-quoted YAML scalar on one line
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("...")
        .strip()
    )


def annotated_yaml(model: BaseModel, indent: int = 0) -> list[str]:
    """The config as YAML lines, each key followed by its docstring as a comment."""
    lines = []
    pad = " " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(annotated_yaml(value, indent + 2))
            continue
        # JSON mode turns nested sections in lists (data.templates, data.augment) into dicts.
        dumped = model.model_dump(mode="json", include={name})[name]
        doc = f"  # {' '.join(info.description.split())}" if info.description else ""
        lines.append(f"{pad}{name}: {_scalar(dumped)}{doc}")
    return lines


def _total_steps(cfg: RunConfig) -> tuple[int, str]:
    """Optimizer steps of the run, and how they were found (epochs need the data)."""
    train = cfg.train
    if train.num_epochs is None:
        return train.max_steps or 0, "train.max_steps"
    from kiln.data import build_datasets, load_splits, make_format, render_rows
    from kiln.models import build_tokenizer

    train_rows, val_rows, stats = load_splits(cfg)
    texts = ["\n".join(parts) for parts in render_rows(make_format(cfg), train_rows)]
    tokenizer = build_tokenizer(cfg, texts)
    train_ds, _, _ = build_datasets(cfg, tokenizer, train_rows, val_rows, stats=stats)
    if cfg.data.curriculum is not None:  # epochs differ in length: the eligible examples
        from kiln.data.curriculum import Curriculum

        cur = Curriculum.for_dataset(cfg, train_ds, train_rows)
        micro = cur.total_micro_batches(train.num_epochs, train.batch_size)
        steps = micro // train.grad_accum_steps
        how = f"{train.num_epochs} curriculum epochs, {micro} batches / {train.grad_accum_steps}"
    else:
        per_epoch = len(train_ds) // train.batch_size
        steps = int(train.num_epochs * per_epoch) // train.grad_accum_steps
        how = f"{train.num_epochs} epochs x {per_epoch} batches / {train.grad_accum_steps}"
    if train.max_steps is not None and train.max_steps < steps:
        return train.max_steps, f"train.max_steps (epochs would give {steps})"
    return steps, how


def _strategy(cfg: RunConfig, world_size: int) -> str:
    """How `world_size` ranks share the model (`train.distributed.strategy`, auto resolved)."""
    if cfg.train.distributed.strategy == "fsdp":
        return f"fsdp on {world_size} ranks (each holds 1/{world_size} of the weights and state)"
    return f"ddp on {world_size} ranks (each holds the whole model)"


def explain(cfg: RunConfig, world_size: int = 1) -> str:
    """A human-readable account of the resolved config (for a run on `world_size` ranks)."""
    from kiln.optim import render_schedule, schedule_for, schedule_table

    train, data = cfg.train, cfg.data
    out = ["# resolved config (every key, with its meaning)", *annotated_yaml(cfg), ""]
    eff_batch = train.batch_size * train.grad_accum_steps * world_size
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    total, how = _total_steps(cfg)
    if cfg.task == "causal_lm" and data.packing:
        per_step = f"{eff_batch * data.max_length:,} (packed blocks of {data.max_length})"
    else:
        longest = data.max_length + (data.max_target_length if cfg.task == "seq2seq" else 0)
        per_step = f"up to {eff_batch * longest:,} (padded to the longest in each batch)"
    out += [
        "# what it implies",
        f"config hash:               {config_hash(cfg)[:16]}",
        f"run directory:             {cfg.run_dir}",
        f"effective batch size:      {eff_batch} sequences "
        f"({train.batch_size} x {train.grad_accum_steps} accumulation{ranks})",
        f"tokens per optimizer step: {per_step}",
        *([f"distributed:               {_strategy(cfg, world_size)}"] if world_size > 1 else []),
        f"total optimizer steps:     {total:,} ({how})",
        f"warmup steps:              {_warmup(cfg.optim, total)}",
    ]
    if total > cfg.optim.warmup_for(total):
        fn = schedule_for(cfg.optim, total)
        out += ["", f"# learning rate ({cfg.optim.scheduler})"]
        out += render_schedule(fn, total, base_lr=cfg.optim.lr).splitlines()
        out += ["", "step        lr"]
        out += [f"{step:<10d}  {lr:.3e}" for step, lr in schedule_table(fn, total, cfg.optim.lr)]
    return "\n".join(out)


def _warmup(optim: Any, total: int) -> str:
    """The warmup steps, and where they come from when it is a fraction."""
    steps = optim.warmup_for(total)
    return str(steps) if optim.warmup_ratio is None else f"{steps} ({optim.warmup_ratio} x {total})"


def explain_facts(cfg: RunConfig, world_size: int = 1, points: int = 100) -> dict[str, Any]:
    """What `explain` says, as data (for the dashboard): effective batch, tokens per step,
    total and warmup steps, and the learning rate at up to `points` steps."""
    from kiln.optim import schedule_for, schedule_table

    train, data = cfg.train, cfg.data
    total, how = _total_steps(cfg)
    eff_batch = train.batch_size * train.grad_accum_steps * world_size
    packed = cfg.task == "causal_lm" and data.packing
    longest = data.max_length + (data.max_target_length if cfg.task == "seq2seq" else 0)
    fn = schedule_for(cfg.optim, total)
    return {
        "config_hash": config_hash(cfg),
        "effective_batch": eff_batch,
        "tokens_per_step": eff_batch * (data.max_length if packed else longest),
        "tokens_per_step_is_max": not packed,
        "total_steps": total,
        "total_steps_from": how,
        "warmup_steps": cfg.optim.warmup_for(total),
        "lr": [[step, lr] for step, lr in schedule_table(fn, total, cfg.optim.lr, points)],
    }
