"""Merge LoRA adapters into their base: a model that transformers loads without PEFT.

`merge_adapter` reads an adapter directory (a LoRA run's final/, or the run directory), loads
its base in full precision on the CPU, folds W + (alpha / r) B A into every adapted weight and
writes a plain `save_pretrained` model plus the tokenizer. The training model is never touched,
so a QLoRA run merges into the full-precision base, not into its 4-bit copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kiln.config import RunConfig, dump_yaml
from kiln.errors import KilnError

__all__ = ["finish_adapter", "merge_adapter"]


def merge_adapter(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the merged model of the LoRA adapter at `src` (a run directory or final/) to `out`.

    Raises:
        KilnError: `src` holds no adapter, or `out` exists and `overwrite` is false.
    """
    from kiln.models.load import load_trained, resolve_model_path

    where = resolve_model_path(src)
    if not (where / "adapter_config.json").is_file():
        raise KilnError(f"{where}: not a LoRA adapter (no adapter_config.json): nothing to merge")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise KilnError(f"{out}: already exists; pass --overwrite or choose another OUT")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    loaded = load_trained(where)
    _write_merged(loaded.model, loaded.tokenizer, loaded.cfg, out)
    return out


def _write_merged(peft_model: Any, tokenizer: Any, cfg: RunConfig | None, out: Path) -> None:
    merged = peft_model.merge_and_unload()  # (in place on the freshly loaded copy)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg is not None:
        lora = cfg.lora.model_copy(
            update={"enabled": False, "qlora": False, "merge_on_finish": False}
        )
        plain = cfg.model_copy(update={"lora": lora})
        (out / "kiln_config.yaml").write_text(dump_yaml(plain))


def finish_adapter(model: Any, adapter_dir: Path, cfg: RunConfig) -> None:
    """Complete a LoRA final/ being written at `adapter_dir` (adapter, tokenizer and
    kiln_config.yaml already there): record the base (`kiln_base.json`) and, with
    `lora.merge_on_finish`, write the merged model to `adapter_dir/merged`."""
    from kiln.models.load import BASE_FILE, load_trained
    from kiln.models.lora import base_fingerprint

    info = {
        "base": cfg.model.name_or_path or f"{cfg.model.arch} from scratch (seed {cfg.seed})",
        "fingerprint": base_fingerprint(model) if cfg.model.arch is not None else None,
    }
    (adapter_dir / BASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if cfg.lora.merge_on_finish:
        loaded = load_trained(adapter_dir)
        tmp = adapter_dir / f".merged.tmp-{os.getpid()}"
        _write_merged(loaded.model, loaded.tokenizer, cfg, tmp)
        os.replace(tmp, adapter_dir / "merged")
