"""What a checkpoint holds for the trainer, and how a resume puts it back.

Everything that decides the next step is saved: trainable weights, optimizer state, the RNG
states, the data cursor (epoch + sample index), counters, the losses not yet logged, the grad
scaler, and callback states. With those restored a CPU fp32 run continues bit-identically.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from kiln.checkpoint import CheckpointManager, find_checkpoint, resume_plan
from kiln.config import RunConfig, config_from_dict, dump_yaml
from kiln.data.cache import fingerprint_matches, tokenizer_fingerprint
from kiln.engine.signals import StoppedBeforeStart, as_stopped
from kiln.errors import KilnError, first_line
from kiln.files import (
    StorageFull,
    storage_full,
    torch_save,
    write_atomic,
)
from kiln.models.sharding import is_sharded
from kiln.process import rng_state, set_rng_state
from kiln.runs import CONFIG

if TYPE_CHECKING:
    from kiln.engine.parts import Parts
    from kiln.engine.rundir import RunDir
    from kiln.engine.state import LoopState
    from kiln.rank import RankContext

__all__ = [
    "UNSAFE_CHANGES",
    "callback_keys",
    "checkpoint_state",
    "checkpoint_writers",
    "compare_configs",
    "explain_failure",
    "find_checkpoint",
    "load_checkpoint_config",
    "load_weights",
    "restore_checkpoint",
    "resume_target",
    "trainable_state_dict",
    "write_shards",
]


# Config keys whose change makes a checkpoint meaningless: shapes, vocabulary, and everything
# that decides which training examples exist and in what order (the cursor indexes into them).
# Everything else may change on resume and is reported.
# train.batch_size is per rank: what must not change is the global batch (batch_size x ranks),
# checked by `check_compatible`, so a run can resume at another world size.
UNSAFE_CHANGES = ("task", "seed", "model.", "tokenizer.", "lora.", "data.")
SAFE_EXCEPTIONS = (
    "data.val",  # validation data does not move the training cursor
    "data.cache_dir",  # where tokens are cached, not what they are
    "data.num_workers",
    "data.loader_workers",  # who builds the batches, not which
    # Checked by what it does, not by its value: restore_checkpoint refuses any change in the
    # training examples or tokens. (Its default went from null to 100000 in issue 11; a run
    # started before that must still resume.)
    "data.max_chars",
    "lora.merge_on_finish",  # what is written at the end, not how training goes
)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights a checkpoint needs: trainable parameters and persistent buffers, each once.

    Frozen parameters (a LoRA base model) are left out: they come back from the base model.
    Tied weights appear once, under their first name.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
            continue
        key = id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


CHECKPOINT_STATE_FORMAT = 2
"""trainer_state.json's format: 2 = a named map of stateful components (format 1, written
before kiln 0.2, kept its parts at the top level and keyed callbacks by list position; it is
read by `_upgrade`)."""


def callback_keys(callbacks: Sequence[Any]) -> list[str]:
    """The stable name each callback's state is saved under: `state_key` (default: the class
    name); a repeated name gets `#2`, `#3`, ... in list order."""
    keys, seen = [], Counter[str]()
    for cb in callbacks:
        key = getattr(cb, "state_key", None) or type(cb).__name__
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def _components(parts: Parts) -> dict[str, Any]:
    """The parts that change the math of training and carry a state_dict, by stable name."""
    regs = parts.regularizers
    named = {"label_smoothing": regs.loss_fn, "grad_noise": regs.grad_noise, "anomaly": parts.guard}
    return {name: part for name, part in named.items() if part is not None}


def checkpoint_state(
    parts: Parts, loop: LoopState, callbacks: Sequence[Any], rank: RankContext
) -> dict[str, Any]:
    """trainer_state.json: everything but weights, optimizer and RNG, as named components."""
    scaler = parts.precision.scaler
    return {
        "format": CHECKPOINT_STATE_FORMAT,
        "loop": loop.state_dict(),  # reads the pending losses: one host sync
        "scaler": scaler.state_dict() if scaler is not None else None,
        "callbacks": {
            key: cb.state_dict()
            for key, cb in zip(callback_keys(callbacks), callbacks, strict=True)
        },
        "components": {name: part.state_dict() for name, part in _components(parts).items()},
        "world_size": rank.world_size,
        "data": {
            "train_examples": len(parts.train_data),
            "train_tokens": parts.train_data.num_tokens,
        },
        "tokenizer": tokenizer_fingerprint(parts.tokenizer),
    }


def _rng_states(rank: RankContext) -> dict[str, Any]:
    """Every rank's RNG states (gathered on the main rank), by rank."""
    mine = rng_state()
    if not rank.distributed:
        return {"ranks": [mine]}
    return {"ranks": rank.all_gather(mine, "checkpoint RNG states")}


def checkpoint_writers(
    cfg: RunConfig,
    parts: Parts,
    loop: LoopState,
    callbacks: Sequence[Any],
    rank: RankContext,
) -> dict[str, Any]:
    """File name -> writer for every file of a checkpoint of the run as it is now. A sharded
    model's weights and optimizer state are not among them: every rank writes its shard with
    `kiln.models.sharding.save_shards`."""
    state = checkpoint_state(parts, loop, callbacks, rank)  # first: it syncs the losses once
    rngs = _rng_states(rank)
    writers: dict[str, Any] = {}
    if parts.parallel.main_writes_weights:  # else every rank writes its shard (FSDP)
        writers["model.safetensors"] = lambda p: save_file(
            trainable_state_dict(parts.model), str(p)
        )
        writers["optimizer.pt"] = lambda p: torch_save(parts.optimizer.state_dict(), p)
    return {
        **writers,
        "rng.pt": lambda p: torch_save(rngs, p),
        "trainer_state.json": lambda p: p.write_text(json.dumps(state)),
        CONFIG: lambda p: write_atomic(p, dump_yaml(cfg), private=True),
    }


def write_shards(
    checkpoints: CheckpointManager, parts: Parts, rank: RankContext, step: int
) -> Path | None:
    """Under FSDP, every rank writes its shard of the weights and optimizer state into the
    staging directory the main rank made for `step`'s checkpoint, and gets its path (the
    main rank completes it with `CheckpointManager.save(..., staging=...)`). None when the
    model is not sharded (or checkpoints are off): the main rank writes whole files."""
    if not (parts.parallel.sharded and checkpoints.enabled):
        return None
    from kiln.models.sharding import SHARDS_DIR, save_shards

    staging = rank.broadcast(checkpoints.stage(step) if rank.is_main else None, "staging")
    save_shards(parts.model, parts.optimizer, staging / SHARDS_DIR)
    return staging


def resume_target(
    want: str | Path | bool, checkpoints: CheckpointManager, run_dir: RunDir, *, overwrite: bool
) -> tuple[Path | None, bool]:
    """(the checkpoint to resume from, whether it belongs to another run), checked before
    minutes of setup: a run directory that already holds a run is refused unless resumed or
    `overwrite`; another run's checkpoint starts this run directory afresh from it. The rule
    is `kiln.checkpoint.resume_plan`'s, which `kiln.preflight` applies before loading too."""
    resume_from, foreign, must_be_free = resume_plan(want, checkpoints, run_dir.path)
    if must_be_free is not None:
        run_dir.check_free(overwrite=overwrite, why=must_be_free)
    return resume_from, foreign


def explain_failure(
    exc: BaseException,
    run_dir: Path,
    checkpoints: CheckpointManager,
    *,
    resumable: bool,
    rank: RankContext | None = None,
) -> BaseException:
    """`exc` with what a failure leaves behind: the run to resume (a signal during setup) or
    the last complete checkpoint (a full disk, however the writing library reported it). On N
    ranks a collective failing becomes where this rank was, printed at once: torchrun may
    SIGTERM a surviving rank a moment after a peer died."""
    exc = as_stopped(exc)  # a signal during setup, turned into another error on its way
    failed = None if rank is None else rank.failure(exc)
    if failed is not None:
        failed.report(rank.rank)
        return failed
    if isinstance(exc, StoppedBeforeStart) and resumable:
        exc.resume_from = str(run_dir)
    if not isinstance(exc, StorageFull) and isinstance(exc, Exception):
        full = storage_full(exc)
        if full is None:
            return exc
        where = getattr(full, "filename", None) or getattr(exc, "filename", None)
        exc = StorageFull(str(where or run_dir), full)
    if isinstance(exc, StorageFull):
        latest = checkpoints.latest()
        exc.last_checkpoint = None if latest is None else latest.path
        exc.args = (exc.message(),)
    return exc


def load_checkpoint_config(path: Path) -> dict[str, Any]:
    """The raw config a checkpoint was written with."""
    return yaml.safe_load((Path(path) / CONFIG).read_text())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_configs(old: RunConfig, new: RunConfig) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between a checkpoint's config and the current one."""
    a = _flatten(old.model_dump(mode="json"))
    b = _flatten(new.model_dump(mode="json"))
    unsafe, safe = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        is_unsafe = key not in SAFE_EXCEPTIONS and any(
            key == u or (u.endswith(".") and key.startswith(u)) for u in UNSAFE_CHANGES
        )
        (unsafe if is_unsafe else safe).append(line)
    return unsafe, safe


def schedule_change(cfg: RunConfig, path: Path, step: int, old_total: int, total: int) -> str:
    """The line a resume logs when the LR schedule it continues is not the checkpoint's (the
    run was extended or shortened, or optim was edited); "" when it is the same. The schedule
    is always the current config's over the current length: an extended run's decay
    re-stretches over the new total (as HF Trainer does when max_steps grows), so the LR of the
    next step jumps; this line shows by how much."""
    from kiln.optim import schedule_for

    old = config_from_dict(load_checkpoint_config(path), str(path / CONFIG))
    before = old.optim.lr * schedule_for(old.optim, old_total)(step)
    after = cfg.optim.lr * schedule_for(cfg.optim, total)(step)
    if old_total == total and before == after:
        return ""
    how = f"re-stretched over {total} steps (was {old_total})" if old_total != total else "changed"
    return (
        f"the {cfg.optim.scheduler} LR schedule {how}: step {step + 1} runs at LR {after:.3e} "
        f"(the checkpoint's schedule: {before:.3e})"
    )


def check_compatible(cfg: RunConfig, path: Path, world_size: int = 1) -> list[str]:
    """Refuse a resume whose config change makes the checkpoint meaningless; return safe ones.
    The global batch (train.batch_size x world size) must be the checkpoint's: the data order
    and the cursor are defined over it."""
    old = config_from_dict(load_checkpoint_config(path), str(path / CONFIG))
    unsafe, safe = compare_configs(old, cfg)
    saved = json.loads((path / "trainer_state.json").read_text()).get("world_size", 1)
    before, now = old.train.batch_size * saved, cfg.train.batch_size * world_size
    if before != now:
        unsafe.append(
            f"global batch (train.batch_size x ranks): {old.train.batch_size} x {saved} = "
            f"{before} -> {cfg.train.batch_size} x {world_size} = {now}"
        )
    if unsafe:
        raise KilnError(
            [
                f"cannot resume from {path}: {line} (changes what the checkpoint means)"
                for line in unsafe
            ]
        )
    return safe + _eval_subset_change(old, cfg, saved, world_size)


def _eval_subset_change(old: RunConfig, new: RunConfig, saved: int, world: int) -> list[str]:
    """The line a resume reports when eval.max_batches now bounds validation to another number
    of samples (max_batches global batches of eval.batch_size x ranks): its curve changes
    subset at this step. With eval.batch_size unset the global eval batch is the global train
    batch, which a resume keeps: at another world size only an explicit eval.batch_size does
    this (besides an edit of either key)."""
    before, now = _eval_samples(old, saved), _eval_samples(new, world)
    if before == now:
        return []
    return [
        f"validation bounded to {now or 'all'} samples (was {before or 'all'}): eval.max_batches "
        "counts global batches of eval.batch_size x ranks; val metrics change subset here"
    ]


def _eval_samples(cfg: RunConfig, ranks: int) -> int | None:
    """The samples a validation covers at most (None: all of them)."""
    if cfg.eval.max_batches is None:
        return None
    return cfg.eval.max_batches * (cfg.eval.batch_size or cfg.train.batch_size) * ranks


def _upgrade(saved: dict[str, Any], path: Path) -> dict[str, Any]:
    """trainer_state.json in the current format (format 1 is converted; a newer one refused)."""
    fmt = saved.get("format", 1)
    if fmt == CHECKPOINT_STATE_FORMAT:
        return saved
    if fmt != 1:
        raise KilnError(
            f"cannot resume from {path}: its trainer_state.json has format {fmt}, newer than "
            f"this kiln reads ({CHECKPOINT_STATE_FORMAT}); upgrade kiln"
        )
    loop_keys = ("state", "pending_losses", "pending_norms", "loss_history", "history")
    return {
        "format": CHECKPOINT_STATE_FORMAT,
        "loop": {
            **{k: saved[k] for k in loop_keys},
            "validation_pending": saved["validation_pending"],
        },
        "scaler": saved["scaler"],
        # "<position>:<class>" -> "<class>", so the state finds its callback by name
        "callbacks": {key.partition(":")[2]: v for key, v in saved["callbacks"].items()},
        "components": {},
        "world_size": 1,
        "data": saved["data"],
        "tokenizer": saved["tokenizer"],
    }


def load_weights(
    path: Path, model: Any, optimizer: torch.optim.Optimizer | None, *, device: torch.device
) -> None:
    """Load a checkpoint's weights (and optimizer state, when `optimizer` is given) into the
    model, whichever way each was written and is held: DCP shards (reshared to this world
    size, or read whole by one process), or full files (sliced for a sharded model).
    Collective when the model is sharded or the checkpoint holds shards. (`is_sharded`: the
    model may come from outside a run, `kiln.load_checkpoint`, with no `Parallelism`.)"""
    from kiln.models.sharding import SHARDS_DIR, has_shards, load_full_state, load_shards

    if has_shards(path):
        try:
            load_shards(path / SHARDS_DIR, model, optimizer)
        except Exception as exc:  # DCP's planner: a key the model has and the shards lack
            raise KilnError(f"cannot resume from {path}: {first_line(exc)}") from None
        return
    weights = load_file(str(path / "model.safetensors"))
    optim_state = None
    if optimizer is not None:
        optim_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    if is_sharded(model):
        missing, unexpected = load_full_state(model, optimizer, weights, optim_state)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        expected = set(trainable_state_dict(model))
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
    if unexpected:
        raise KilnError(f"cannot resume from {path}: unexpected weights {unexpected[:3]}")
    if set(missing) & expected:
        raise KilnError(
            f"cannot resume from {path}: missing weights {sorted(set(missing) & expected)[:3]}"
        )


def restore_checkpoint(
    path: Path,
    parts: Parts,
    loop: LoopState,
    callbacks: Sequence[Any],
    rank: RankContext,
) -> None:
    """Load a verified checkpoint into set-up parts (model, optimizer, RNG, loop, callbacks)."""
    saved = _upgrade(json.loads((path / "trainer_state.json").read_text()), path)
    data = saved["data"]
    train = parts.train_data
    if data != {"train_examples": len(train), "train_tokens": train.num_tokens}:
        raise KilnError(
            f"cannot resume from {path}: the training data changed "
            f"(checkpoint: {data['train_examples']} examples, {data['train_tokens']} tokens; now: "
            f"{len(train)} examples, {train.num_tokens} tokens)"
        )
    want = saved["tokenizer"]
    if want is not None and not fingerprint_matches(parts.tokenizer, want):
        raise KilnError(f"cannot resume from {path}: the tokenizer differs from the checkpoint's")
    load_weights(path, parts.model, parts.optimizer, device=parts.device)
    loop.load_state_dict(saved["loop"], parts.device)
    scaler = parts.precision.scaler
    if saved["scaler"] is not None and scaler is not None:
        scaler.load_state_dict(saved["scaler"])
    states = saved["callbacks"]
    for key, cb in zip(callback_keys(callbacks), callbacks, strict=True):
        if key in states:
            cb.load_state_dict(states[key])
    for name, part in _components(parts).items():
        if name in saved["components"]:
            part.load_state_dict(saved["components"][name])
    rngs = torch.load(path / "rng.pt", weights_only=False)
    ranks = rngs.get("ranks", [rngs])  # format 1: one process's states
    set_rng_state(ranks[rank.rank] if rank.rank < len(ranks) else ranks[0])
