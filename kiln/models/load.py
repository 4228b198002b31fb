"""Load what a run produced, for `kiln generate` and `kiln merge`.

Accepted paths: a run directory (its final/, else its newest complete checkpoint), a final/
directory (a full model, or a LoRA adapter: its base is loaded from `model.name_or_path`, or
rebuilt from the seeded config when it was trained from scratch), a checkpoint directory
(checkpoints/step-N), or any transformers model directory.

Checkpoints are checked against their manifest's checksums before they are loaded, as resume
does: a run's newest checkpoint that fails is skipped for the next older one (with a warning),
one named explicitly is refused. Files that cannot be read (a truncated model.safetensors, a
config.json or tokenizer.json that is not what it should be) give one line naming the
directory and the first line of the cause, never a traceback. Where things lie in a run
directory is `kiln.runs`'s business.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kiln.config import RunConfig, config_from_dict
from kiln.errors import KilnError, ModelError
from kiln.models.build import LOAD_ERRORS, load_failure
from kiln.runs import RunPaths, config_file, read_config_raw, run_dir_of

__all__ = [
    "BASE_FILE",
    "TrainedModel",
    "build_base",
    "load_saved_tokenizer",
    "load_trained",
    "read_run_config",
    "resolve_model_path",
]

logger = logging.getLogger("kiln")

BASE_FILE = "kiln_base.json"
"""Written next to a LoRA adapter: where its base comes from and the base's fingerprint."""

# A JSON config that parses but is not an object (config.json holding a list) ends in a
# TypeError ("argument after ** must be a mapping") inside transformers and peft.
_CONFIG_ERRORS = (*LOAD_ERRORS, TypeError)


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
    weights = (path / "model.safetensors").is_file() or (path / "dcp").is_dir()  # dcp: FSDP
    return weights and (path / "trainer_state.json").is_file()


def resolve_model_path(path: str | Path) -> Path:
    """The directory to load: final/ of a run directory, else its newest complete checkpoint.

    A checkpoint is verified against its manifest first: a run's newest checkpoint that fails is
    skipped (logged) for the next older one; a checkpoint directory given itself must pass.

    Raises:
        KilnError: the path does not exist, holds nothing loadable, or is a corrupt checkpoint.
    """
    from kiln.checkpoint import CheckpointManager

    path = Path(path).expanduser()
    if not path.is_dir():
        raise KilnError(f"{path}: no such directory")
    if _is_checkpoint(path):  # first: a checkpoint has a config.json too (from_pretrained)
        try:
            return CheckpointManager(path.parent).verify(path).path
        except ValueError as exc:
            raise KilnError(str(exc)) from None
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    run = RunPaths(path)
    if run.final.is_dir():
        return run.final
    if run.checkpoints.is_dir():
        manager = CheckpointManager(run.checkpoints)
        infos = manager.list()
        # Newest first; one whose files fail their checksums is never loaded (it would decode
        # garbage without a word), the next older complete one is.
        for info in reversed(infos):
            try:
                return manager.verify(info.path).path
            except ValueError as exc:
                logger.warning("skipping checkpoint: %s", exc)
        if infos:
            raise KilnError(
                f"{path}: no final/ and no checkpoint that passes its checksums "
                f"({len(infos)} corrupt)"
            )
    raise KilnError(
        f"{path}: not a run directory, final/, checkpoint or model directory "
        "(no final/, checkpoints/, config.json or adapter_config.json)"
    )


def read_run_config(path: Path) -> RunConfig | None:
    """The kiln config saved with a model (final/kiln_config.yaml) or checkpoint (config.yaml).

    Raises:
        KilnError: the file exists but is not a readable kiln config.
    """
    raw = read_config_raw(path)
    return None if raw is None else config_from_dict(raw, str(config_file(path)))


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
        try:
            want = float(json.loads(info_file.read_text())["fingerprint"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise KilnError(f"{info_file}: unreadable: {load_failure(exc)}") from None
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
    from kiln.data.cache import fingerprint_matches
    from kiln.models.tokenizer import build_tokenizer, ensure_pad_token

    state_file = ckpt / "trainer_state.json"
    try:
        want = json.loads(state_file.read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not a JSON object
        raise KilnError(f"{state_file}: unreadable: {load_failure(exc)}") from None
    run = run_dir_of(ckpt)
    final = RunPaths(run).final if run is not None else None
    # The checkpoint's own copy (written since issue 26), else final/'s: shortcuts, checked.
    for saved in (ckpt, final):
        if saved is None or not (saved / "tokenizer_config.json").is_file():
            continue
        try:
            tok = load_saved_tokenizer(saved)
        except KilnError as exc:
            # Only a shortcut: the tokenizer can still be rebuilt and checked below.
            logger.warning("%s; rebuilding the checkpoint's tokenizer instead", exc)
            continue
        ensure_pad_token(tok)
        if want is None or fingerprint_matches(tok, want):
            return tok
    texts = None
    if cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None:
        # Trained on the data: train it again (deterministic) from the same rows.
        from kiln.data import load_splits, make_format, render_rows

        logger.info("retraining the run's tokenizer on %s", cfg.data.train)
        train_rows, _, _ = load_splits(cfg)
        texts = ["\n".join(parts) for parts in render_rows(make_format(cfg), train_rows)]
    tok = build_tokenizer(cfg, texts)
    if want is not None and not fingerprint_matches(tok, want):
        raise KilnError(f"{ckpt}: cannot rebuild the tokenizer this checkpoint was trained with")
    return tok


def _load_checkpoint(path: Path) -> TrainedModel:
    """A checkpoint (already verified by `resolve_model_path`) on a model built from its config."""
    from safetensors.torch import load_file

    from kiln.models.build import build_model

    cfg = read_run_config(path)
    if cfg is None:
        raise KilnError(f"{path}: checkpoint without config.yaml")
    tokenizer = _tokenizer_for_checkpoint(path, cfg)
    model = build_model(_inference_config(cfg, lora=True), tokenizer)
    if (path / "dcp").is_dir():  # written under FSDP: the shards, read whole
        from kiln.models.sharding import load_shards

        try:
            load_shards(path / "dcp", model)
        except Exception as exc:  # DCP: unreadable shards, or weights the model lacks
            raise KilnError(f"{path / 'dcp'}: cannot load: {load_failure(exc)}") from None
        return TrainedModel(model, tokenizer, cfg.task, cfg, path, "checkpoint")
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise KilnError(f"{weights}: cannot load: {load_failure(exc)}") from None
    try:
        _, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: the config was edited after the checkpoint
        raise KilnError(f"{path}: weights that do not fit the model: {load_failure(exc)}") from None
    if unexpected:
        raise KilnError(f"{path}: weights that do not fit the model: {unexpected[:3]}")
    return TrainedModel(model, tokenizer, cfg.task, cfg, path, "checkpoint")


def load_saved_tokenizer(path: Path) -> Any:
    """The tokenizer saved in `path`, or a one-line KilnError naming it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except _CONFIG_ERRORS as exc:
        raise KilnError(f"{path}: cannot load the tokenizer: {load_failure(exc)}") from None
    except Exception as exc:
        # The tokenizers library (Rust) reports a tokenizer.json that is JSON but not a
        # tokenizer ("data did not match any variant of untagged enum ...") with a plain
        # Exception, and with nothing more specific; a subclass is a bug, not a bad file.
        if type(exc) is not Exception:
            raise
        file = path / "tokenizer.json"
        raise KilnError(f"{file}: cannot load the tokenizer: {load_failure(exc)}") from None
    return _as_saved(path, tokenizer)


def _as_saved(path: Path, tokenizer: Any) -> Any:
    """`tokenizer`, or the tokenizer.json of `path` as it is when transformers rebuilt another
    model from it: a class chosen by config.json's model type (BERT's WordPiece) over a BPE
    tokenizer.json fails on the first encode ("Missing [UNK] token")."""
    from transformers import PreTrainedTokenizerFast

    file = path / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        saved = json.loads(file.read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return tokenizer  # no tokenizer.json, or one without a model type: nothing to compare
    loaded = type(getattr(backend, "model", None)).__name__
    if backend is None or loaded == saved:
        return tokenizer
    logger.info(
        "%s: a %s tokenizer, which %s would load as %s; loading it as saved",
        file,
        saved,
        type(tokenizer).__name__,
        loaded,
    )
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _load_dir(path: Path) -> TrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from kiln.models.tokenizer import ensure_pad_token

    cfg = read_run_config(path)
    tokenizer = load_saved_tokenizer(path)
    ensure_pad_token(tokenizer)
    if (path / "adapter_config.json").is_file():
        if cfg is None:
            raise KilnError(f"{path}: a LoRA adapter without kiln_config.yaml (not a kiln run)")
        peft = _peft()
        base = build_base(cfg, tokenizer, path)
        from kiln.models.quiet import peft_quietly

        try:
            with peft_quietly():
                model = peft.PeftModel.from_pretrained(base, str(path))
        except _CONFIG_ERRORS as exc:
            raise KilnError(f"{path}: cannot load the LoRA adapter: {load_failure(exc)}") from None
        return TrainedModel(model, tokenizer, cfg.task, cfg, path, "adapter")
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except _CONFIG_ERRORS as exc:
        raise KilnError(f"{path}: cannot load the model config: {load_failure(exc)}") from None
    task = cfg.task if cfg is not None else None
    if task is None:
        task = "seq2seq" if hf_config.is_encoder_decoder else "causal_lm"
    auto = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype) if cfg is not None else "auto"
    try:
        model = auto.from_pretrained(str(path), config=hf_config, dtype=dtype)
    except LOAD_ERRORS as exc:
        raise KilnError(f"{path}: cannot load the model: {load_failure(exc)}") from None
    return TrainedModel(model, tokenizer, task, cfg, path, "full")


def _peft() -> Any:
    from kiln.models.lora import import_peft

    return import_peft()


def load_trained(path: str | Path, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a run's model (final/ or a checkpoint) with its tokenizer, in eval mode.

    Args:
        path: a run directory, final/, a checkpoint directory or a model directory.
        device: where to put the model.

    Raises:
        KilnError: nothing loadable at `path`, a checkpoint that fails its checksums, a file
            that cannot be read (one line naming it), or a base that cannot be rebuilt.
    """
    where = resolve_model_path(path)
    loaded = _load_checkpoint(where) if _is_checkpoint(where) else _load_dir(where)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded
