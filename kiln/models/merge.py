"""Merge LoRA adapters into their base: a model that transformers loads without PEFT.

`merge_adapter` reads an adapter directory (a LoRA run's final/, or the run directory), loads
its base in full precision on the CPU, folds W + (alpha / r) B A into every adapted weight and
writes a plain `save_pretrained` model plus the tokenizer. The training model is never touched,
so a QLoRA run merges into the full-precision base, not into its 4-bit copy.

Nothing the user has is lost by a merge that fails or is refused:
- OUT may not be (or lie inside) the adapter, its run directory, the directory given, or the
  local base model, nor contain one of them (`--overwrite` would delete it); paths are compared
  resolved, so `RUN/x/../final` and symlinks are caught.
- The merged model is written into a work directory next to OUT (same filesystem), fsynced, and
  only then swapped in: the old OUT is renamed aside, the new one renamed into place, the old one
  removed. A failure before the swap leaves OUT as it was. A crash between the two renames
  leaves the old OUT in `.<OUT>.kiln-merge-*/old`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from kiln.config import RunConfig, dump_yaml
from kiln.errors import KilnError
from kiln.files import (
    RunLock,
    StorageFull,
    fsync_tree,
    is_within,
    resolve_path,
    storage_full,
    swap_dir,
    write_atomic,
)
from kiln.runs import FINAL, FINAL_CONFIG, RunPaths

__all__ = ["finish_adapter", "merge_adapter"]


def merge_adapter(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the merged model of the LoRA adapter at `src` (a run directory or final/) to `out`.

    Returns:
        `out`, resolved.

    Raises:
        KilnError: `src` holds no adapter; `out` overlaps what is merged; `out` exists and
            `overwrite` is false; `out` cannot be written.
    """
    from kiln.models.build import load_failure
    from kiln.models.load import load_trained, read_run_config, resolve_model_path

    where = resolve_model_path(src)
    if not (where / "adapter_config.json").is_file():
        raise KilnError(f"{where}: not a LoRA adapter (no adapter_config.json): nothing to merge")
    target = resolve_path(out, "OUT")
    _refuse_overlap(out, target, _sources(src, where, read_run_config(where)))
    if os.path.lexists(target) and not overwrite and not _is_empty_dir(target):
        raise KilnError(f"{out}: already exists; pass --overwrite or choose another OUT")

    run = _run_of(where)
    # A training run (fresh or resumed) must not rewrite final/ while it is being merged.
    lock = RunLock(run) if run is not None else contextlib.nullcontext()
    work = _work_dir(out, target)
    new = work / "new"
    try:
        with lock:
            loaded = load_trained(where)
            try:
                _write_merged(loaded.model, loaded.tokenizer, loaded.cfg, new)
                fsync_tree(new)
            except (OSError, SafetensorError) as exc:  # disk full, no permission
                full = storage_full(exc)
                if full is not None:  # exit code 5, like a full disk during training
                    raise StorageFull(f"the merged model {out} (OUT is unchanged)", full) from None
                raise KilnError(
                    f"{out}: cannot write the merged model ({load_failure(exc)}); OUT is unchanged"
                ) from None
            swap_dir(new, target, work / "old")
    finally:
        shutil.rmtree(new, ignore_errors=True)  # a merge that did not make it into place
        if os.path.lexists(target):
            # OUT is in place (the new one, or the old one put back): a parked old OUT is stale.
            _remove(work / "old")
        # Left behind, with old/ in it, only when OUT could not be put back: the user's data.
        with contextlib.suppress(OSError):
            work.rmdir()
    return target


def _run_of(adapter: Path) -> Path | None:
    """The run directory an adapter belongs to (itself, or the run around final/), if any."""
    for run in (adapter, adapter.parent) if adapter.name == FINAL else (adapter,):
        if _looks_like_run(run):
            return resolve_path(run)
    return None


def _looks_like_run(path: Path) -> bool:
    """A run directory, for merging: its config.yaml or its checkpoints/ (a run copied without
    its config counts too: the merge must not write over it)."""
    paths = RunPaths(path)
    return paths.config.is_file() or paths.checkpoints.is_dir()


def _sources(src: str | Path, adapter: Path, cfg: RunConfig | None) -> list[tuple[str, Path]]:
    """(what, resolved path) of what the merge reads or belongs to: OUT must leave them alone."""
    sources = [
        ("the adapter being merged", resolve_path(adapter)),
        ("the run directory being merged", resolve_path(src)),
    ]
    run = adapter.parent
    if adapter.name == FINAL and _looks_like_run(run):
        # Given RUN/final, the run around it (checkpoints, metrics) is the user's too.
        sources.append(("the adapter's run directory", resolve_path(run)))
    base = cfg.model.name_or_path if cfg is not None else None
    if base is not None and Path(base).expanduser().is_dir():
        sources.append(("the adapter's base model", resolve_path(base, "model.name_or_path")))
    return sources


def _refuse_overlap(out: str | Path, target: Path, sources: list[tuple[str, Path]]) -> None:
    for what, path in sources:
        if target == path:
            raise KilnError(f"{out}: is {what} ({path}); choose another OUT")
        if is_within(target, path):
            raise KilnError(f"{out}: is inside {what} ({path}); choose an OUT outside it")
        if is_within(path, target):
            raise KilnError(
                f"{out}: contains {what} ({path}), which --overwrite would delete; "
                "choose another OUT"
            )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            path.unlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _work_dir(out: str | Path, target: Path) -> Path:
    """A fresh directory next to OUT (same filesystem, so the swap is two renames)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise KilnError(f"{out}: cannot create its parent directory: {reason}") from None
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.kiln-merge-", dir=target.parent))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise KilnError(f"{out}: cannot write into {target.parent}: {reason}") from None


def _write_merged(peft_model: Any, tokenizer: Any, cfg: RunConfig | None, out: Path) -> None:
    from kiln.models.quiet import no_hf_progress

    merged = peft_model.merge_and_unload()  # (in place on the freshly loaded copy)
    out.mkdir(parents=True, exist_ok=True)
    with no_hf_progress():
        merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg is not None:
        lora = cfg.lora.model_copy(
            update={"enabled": False, "qlora": False, "merge_on_finish": False}
        )
        plain = cfg.model_copy(update={"lora": lora})
        write_atomic(out / FINAL_CONFIG, dump_yaml(plain), private=True)


def finish_adapter(
    model: Any, adapter_dir: Path, cfg: RunConfig, *, fingerprint: float | None = None
) -> None:
    """Complete a LoRA final/ being written at `adapter_dir` (adapter, tokenizer and
    kiln_config.yaml already there): record the base (`kiln_base.json`) and, with
    `lora.merge_on_finish`, write the merged model to `adapter_dir/merged`. `fingerprint`:
    the base's, already computed (a sharded model's, by all ranks); None: from `model`."""
    from kiln.models.load import BASE_FILE, load_trained
    from kiln.models.lora import base_fingerprint

    if fingerprint is None and cfg.model.arch is not None:
        fingerprint = base_fingerprint(model)
    info = {
        "base": cfg.model.name_or_path or f"{cfg.model.arch} from scratch (seed {cfg.seed})",
        "fingerprint": fingerprint,
    }
    (adapter_dir / BASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if cfg.lora.merge_on_finish:
        loaded = load_trained(adapter_dir)
        tmp = adapter_dir / f".merged.tmp-{os.getpid()}"
        _write_merged(loaded.model, loaded.tokenizer, cfg, tmp)
        os.replace(tmp, adapter_dir / "merged")
