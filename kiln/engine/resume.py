"""What a checkpoint holds for the trainer, and how a resume puts it back.

Everything that decides the next step is saved: trainable weights, optimizer state, the RNG
states, the data cursor (epoch + sample index), counters, the losses not yet logged, the grad
scaler, and callback states. With those restored a CPU fp32 run continues bit-identically.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from kiln.checkpoint import CheckpointManager
from kiln.config import RunConfig, config_from_dict, dump_yaml
from kiln.engine.signals import StoppedBeforeStart
from kiln.errors import KilnError
from kiln.files import StorageFull, resolve_path, storage_full, torch_save, write_atomic

if TYPE_CHECKING:
    from kiln.engine.trainer import Trainer

__all__ = [
    "UNSAFE_CHANGES",
    "checkpoint_writers",
    "compare_configs",
    "explain_failure",
    "find_checkpoint",
    "load_checkpoint_config",
    "restore_checkpoint",
    "trainable_state_dict",
]

log = logging.getLogger("kiln")

# Config keys whose change makes a checkpoint meaningless: shapes, vocabulary, and everything
# that decides which training examples exist and in what order (the cursor indexes into them).
# Everything else may change on resume and is reported.
UNSAFE_CHANGES = ("task", "seed", "model.", "tokenizer.", "lora.", "data.", "train.batch_size")
SAFE_EXCEPTIONS = (
    "data.val",  # validation data does not move the training cursor
    "data.cache_dir",  # where tokens are cached, not what they are
    "data.num_workers",
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


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


def _trainer_state(trainer: Trainer) -> dict[str, Any]:
    scaler = trainer.precision.scaler
    return {
        "state": trainer.state.state_dict(),
        "pending_losses": torch.stack(trainer._pending_losses).tolist()
        if trainer._pending_losses
        else [],
        "pending_norms": torch.stack(trainer._pending_norms).tolist()
        if trainer._pending_norms
        else [],
        "loss_history": trainer.loss_history,
        "history": trainer.history,
        "validation_pending": trainer._validation_pending,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "callbacks": {
            f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(trainer.callbacks)
        },
        "data": {
            "train_examples": len(trainer.train_data),
            "train_tokens": trainer.train_data.num_tokens,
        },
        "tokenizer": _tokenizer_fingerprint(trainer.tokenizer),
    }


def checkpoint_writers(trainer: Trainer) -> dict[str, Any]:
    """File name -> writer for every file of a checkpoint of the trainer as it is now."""
    trainer_state = _trainer_state(trainer)  # read first: it syncs the pending losses once
    return {
        "model.safetensors": lambda p: save_file(trainable_state_dict(trainer.model), str(p)),
        "optimizer.pt": lambda p: torch_save(trainer.optimizer.state_dict(), p),
        "rng.pt": lambda p: torch_save(_rng_state(), p),
        "trainer_state.json": lambda p: p.write_text(json.dumps(trainer_state)),
        "config.yaml": lambda p: write_atomic(p, dump_yaml(trainer.cfg), private=True),
    }


def find_checkpoint(want: str | Path | bool, checkpoints: CheckpointManager) -> Path | None:
    """The verified checkpoint `want` names: False none; True/"latest" the newest complete one
    of the run (an error if there is none); "auto" the same or None; a path: a checkpoint, or a
    run directory (its newest complete one)."""
    if want is False:
        return None
    if want in (True, "latest", "auto"):
        return _newest_valid(checkpoints, required=want != "auto")
    path = resolve_path(want, "--resume")  # type: ignore[arg-type]
    if not (path / "manifest.json").exists() and (path / "checkpoints").is_dir():
        return _newest_valid(CheckpointManager(path / "checkpoints"), required=True)
    try:
        return checkpoints.verify(path).path
    except ValueError as exc:
        raise KilnError(f"--resume: {exc}") from None


def explain_failure(
    exc: BaseException, run_dir: Path, checkpoints: CheckpointManager, *, resumable: bool
) -> BaseException:
    """`exc` with what a failure leaves behind: the run to resume (a signal during setup) or
    the last complete checkpoint (a full disk, however the writing library reported it)."""
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


def _newest_valid(manager: CheckpointManager, *, required: bool) -> Path | None:
    """Newest checkpoint that passes its checksums; one that fails is skipped, and said so."""
    for info in reversed(manager.list()):
        try:
            return manager.verify(info.path).path
        except ValueError as exc:
            log.warning("skipping checkpoint: %s", exc)
    if required:
        raise KilnError(f"--resume: no complete checkpoint in {manager.root}")
    return None


def load_checkpoint_config(path: Path) -> dict[str, Any]:
    """The raw config a checkpoint was written with."""
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


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


def check_compatible(trainer: Trainer, path: Path) -> list[str]:
    """Refuse a resume whose config change makes the checkpoint meaningless; return safe ones."""
    old = config_from_dict(load_checkpoint_config(path), str(path / "config.yaml"))
    unsafe, safe = compare_configs(old, trainer.cfg)
    if unsafe:
        raise KilnError(
            [
                f"cannot resume from {path}: {line} (changes what the checkpoint means)"
                for line in unsafe
            ]
        )
    return safe


def restore_checkpoint(trainer: Trainer, path: Path) -> None:
    """Load a verified checkpoint into a set-up trainer (model, optimizer, RNG, state)."""
    saved = json.loads((path / "trainer_state.json").read_text())
    data = saved["data"]
    if data != {
        "train_examples": len(trainer.train_data),
        "train_tokens": trainer.train_data.num_tokens,
    }:
        raise KilnError(
            f"cannot resume from {path}: the training data changed "
            f"(checkpoint: {data['train_examples']} examples, {data['train_tokens']} tokens; now: "
            f"{len(trainer.train_data)} examples, {trainer.train_data.num_tokens} tokens)"
        )
    if saved["tokenizer"] != _tokenizer_fingerprint(trainer.tokenizer):
        raise KilnError(f"cannot resume from {path}: the tokenizer differs from the checkpoint's")
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    if unexpected:
        raise KilnError(f"cannot resume from {path}: unexpected weights {unexpected[:3]}")
    expected = trainable_state_dict(trainer.model).keys()
    if set(missing) & set(expected):
        raise KilnError(
            f"cannot resume from {path}: missing weights {sorted(set(missing) & set(expected))[:3]}"
        )
    optim_state = torch.load(path / "optimizer.pt", map_location=trainer.device, weights_only=True)
    trainer.optimizer.load_state_dict(optim_state)
    trainer.state.load_state_dict(saved["state"])
    device = trainer.device
    trainer._pending_losses = [torch.tensor(x, device=device) for x in saved["pending_losses"]]
    trainer._pending_norms = [torch.tensor(x, device=device) for x in saved["pending_norms"]]
    trainer.loss_history = list(saved["loss_history"])
    trainer.history = list(saved["history"])
    trainer._validation_pending = bool(saved["validation_pending"])
    if saved["scaler"] is not None and trainer.precision.scaler is not None:
        trainer.precision.scaler.load_state_dict(saved["scaler"])
    states = saved["callbacks"]
    for i, cb in enumerate(trainer.callbacks):
        key = f"{i}:{type(cb).__name__}"
        if key in states:
            cb.load_state_dict(states[key])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
