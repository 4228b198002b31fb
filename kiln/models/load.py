"""Load what a run produced, for `kiln generate` and `kiln merge`.

Accepted paths: a run directory (its final/, else its newest complete checkpoint), a final/
directory (a full model, or a LoRA adapter: its base is loaded from `model.name_or_path`, or
rebuilt from the seeded config when it was trained from scratch), a checkpoint directory
(checkpoints/step-N), or any transformers model directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.config import RunConfig, config_from_dict
from kiln.errors import KilnError, ModelError

__all__ = ["BASE_FILE", "TrainedModel", "build_base", "load_trained", "resolve_model_path"]

logger = logging.getLogger("kiln")

BASE_FILE = "kiln_base.json"
"""Written next to a LoRA adapter: where its base comes from and the base's fingerprint."""


@dataclass
class TrainedModel:
    """A loaded model with its tokenizer and task."""

    model: Any
    tokenizer: Any
    task: str
    cfg: RunConfig | None
    path: Path
    """The directory the weights came from (final/, a checkpoint, a model directory)."""
    kind: str
    """full, adapter or checkpoint."""


def _is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "trainer_state.json").is_file()


def resolve_model_path(path: str | Path) -> Path:
    """The directory to load: final/ of a run directory, else its newest complete checkpoint.

    Raises:
        KilnError: the path does not exist or holds nothing loadable.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise KilnError(f"{path}: no such directory")
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    if _is_checkpoint(path):
        return path
    if (path / "final").is_dir():
        return path / "final"
    if (path / "checkpoints").is_dir():
        from kiln.checkpoint import CheckpointManager

        infos = CheckpointManager(path / "checkpoints").list()
        if infos:
            return infos[-1].path
    raise KilnError(
        f"{path}: not a run directory, final/, checkpoint or model directory "
        "(no final/, checkpoints/, config.json or adapter_config.json)"
    )


def _read_config(path: Path) -> RunConfig | None:
    for name in ("kiln_config.yaml", "config.yaml"):
        file = path / name
        if file.is_file():
            return config_from_dict(yaml.safe_load(file.read_text()), str(file))
    return None


def _inference_config(cfg: RunConfig, *, lora: bool) -> RunConfig:
    """The run's config for building the model to load into: no checkpointing, no 4-bit."""
    model = cfg.model.model_copy(update={"gradient_checkpointing": False})
    lora_cfg = cfg.lora.model_copy(
        update={"enabled": lora and cfg.lora.enabled, "qlora": False, "merge_on_finish": False}
    )
    return cfg.model_copy(update={"model": model, "lora": lora_cfg})


def build_base(cfg: RunConfig, tokenizer: Any, adapter_dir: Path | None = None) -> Any:
    """The base model a LoRA run trained on, in full precision (`model.dtype`), on the CPU.

    Pretrained: loaded from `model.name_or_path`. From scratch: rebuilt from the seeded config
    and checked against the fingerprint saved next to the adapter (`kiln_base.json`).

    Raises:
        ModelError: the rebuilt base differs from the one the adapter was trained on.
    """
    from kiln.models.build import build_model
    from kiln.models.lora import base_fingerprint

    base = build_model(_inference_config(cfg, lora=False), tokenizer)
    info_file = None if adapter_dir is None else adapter_dir / BASE_FILE
    if cfg.model.arch is not None and info_file is not None and info_file.is_file():
        want = json.loads(info_file.read_text())["fingerprint"]
        got = base_fingerprint(base)
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            raise ModelError(
                f"{adapter_dir}: the base model rebuilt from the config differs from the one "
                "the adapter was trained on (was it passed in as an object?); merge it yourself "
                "with peft.PeftModel.from_pretrained(base, adapter_dir)"
            )
    return base


def _tokenizer_for_checkpoint(ckpt: Path, cfg: RunConfig) -> Any:
    """The tokenizer a checkpoint was trained with (checkpoints hold only its fingerprint)."""
    from kiln.engine.resume import _tokenizer_fingerprint
    from kiln.models.tokenizer import build_tokenizer, ensure_pad_token

    want = json.loads((ckpt / "trainer_state.json").read_text()).get("tokenizer")
    final = ckpt.parent.parent / "final"
    if final.is_dir() and (final / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(final))
        ensure_pad_token(tok)
        if want is None or _tokenizer_fingerprint(tok) == want:
            return tok
    texts = None
    if cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None:
        # Trained on the data: train it again (deterministic) from the same rows.
        from kiln.data import load_splits, make_format, render_rows

        logger.info("retraining the run's tokenizer on %s", cfg.data.train)
        train_rows, _, _ = load_splits(cfg)
        texts = ["\n".join(parts) for parts in render_rows(make_format(cfg), train_rows)]
    tok = build_tokenizer(cfg, texts)
    if want is not None and _tokenizer_fingerprint(tok) != want:
        raise KilnError(f"{ckpt}: cannot rebuild the tokenizer this checkpoint was trained with")
    return tok


def _load_checkpoint(path: Path) -> TrainedModel:
    from safetensors.torch import load_file

    from kiln.models.build import build_model

    cfg = _read_config(path)
    if cfg is None:
        raise KilnError(f"{path}: checkpoint without config.yaml")
    tokenizer = _tokenizer_for_checkpoint(path, cfg)
    model = build_model(_inference_config(cfg, lora=True), tokenizer)
    _, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if unexpected:
        raise KilnError(f"{path}: weights that do not fit the model: {unexpected[:3]}")
    return TrainedModel(model, tokenizer, cfg.task, cfg, path, "checkpoint")


def _load_dir(path: Path) -> TrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from kiln.models.tokenizer import ensure_pad_token

    cfg = _read_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise KilnError(f"{path}: cannot load the tokenizer: {_first_line(exc)}") from None
    ensure_pad_token(tokenizer)
    if (path / "adapter_config.json").is_file():
        if cfg is None:
            raise KilnError(f"{path}: a LoRA adapter without kiln_config.yaml (not a kiln run)")
        peft = _peft()
        base = build_base(cfg, tokenizer, path)
        model = peft.PeftModel.from_pretrained(base, str(path))
        return TrainedModel(model, tokenizer, cfg.task, cfg, path, "adapter")
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise KilnError(f"{path}: cannot load the model config: {_first_line(exc)}") from None
    task = cfg.task if cfg is not None else None
    if task is None:
        task = "seq2seq" if hf_config.is_encoder_decoder else "causal_lm"
    auto = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype) if cfg is not None else "auto"
    try:
        model = auto.from_pretrained(str(path), config=hf_config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise KilnError(f"{path}: cannot load the model: {_first_line(exc)}") from None
    return TrainedModel(model, tokenizer, task, cfg, path, "full")


def _peft() -> Any:
    from kiln.models.lora import import_peft

    return import_peft()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_trained(path: str | Path, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a run's model (final/ or a checkpoint) with its tokenizer, in eval mode.

    Args:
        path: a run directory, final/, a checkpoint directory or a model directory.
        device: where to put the model.

    Raises:
        KilnError: nothing loadable at `path`, or a base that cannot be rebuilt.
    """
    where = resolve_model_path(path)
    loaded = _load_checkpoint(where) if _is_checkpoint(where) else _load_dir(where)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded
