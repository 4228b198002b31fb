"""CheckpointManager: atomic, verified, rotated checkpoints under `<run>/checkpoints/`.

A checkpoint is written into a staging directory, every file is fsynced, a manifest (files,
sizes, checksums, step, config hash) is written last, and the directory is renamed into place
as `step-<N>/`. A directory without a valid manifest is never loaded: a crash at any moment
leaves either the old set of checkpoints or the old set plus one complete new one.

Files of one checkpoint:
    model.safetensors     trainable weights (all of them; only the adapters under LoRA)
    optimizer.pt          optimizer state_dict
    dcp/                  instead of the two above under FSDP: every rank's shard of both
                          (torch.distributed.checkpoint), written into the staging directory
                          by all ranks before the main rank completes it
    rng.pt                python, numpy, torch CPU and CUDA RNG states
    trainer_state.json    TrainState, pending losses, loss history, eval history, grad scaler,
                          callback and component states
    config.yaml           the resolved config that wrote it
    config.json, ...      what transformers loads it with, read by no resume: the model's
                          config.json and generation_config.json and the tokenizer's files
                          (`from_pretrained("step-N")` reads model.safetensors), or under LoRA
                          adapter_config.json + adapter_model.safetensors (`PeftModel`); none
                          under FSDP (`kiln.engine.loadable`)
    manifest.json         written last; its presence and checksums make the checkpoint valid

Saving overlaps the work: while the next file is written, background threads fsync the files
already written and crc32 them in pieces (`_PIECE` bytes each, hashed in parallel). The
manifest goes last, after every fsync and checksum has finished, and records each piece's crc32
(format 2), so verifying hashes the pieces in parallel too and names the piece that differs:

    "files": {"model.safetensors": {"size": 70000000, "piece": 33554432,
                                    "crc32": ["0a1b2c3d", "4e5f6a7b", "8c9d0e1f"]}, ...}

`crc32[i]` covers bytes `[i * piece, min((i + 1) * piece, size))`; an empty file has none.
Format 1 manifests (before per-piece crc32s) hold one crc32 of the whole file per file,
`{"size": N, "checksum": "d49a2e3f"}`; they still verify, each file in one sequential pass.

What `--resume` names (`find_checkpoint`) and whether the run directory must then hold no run
(`resume_plan`) are decided here, without torch: the engine applies the rule at setup, and
`kiln.preflight` before anything loads (with manifests and sizes only, not checksums).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kiln.errors import KilnError
from kiln.files import fsync_dir, is_within, json_text, resolve_path, writing
from kiln.rundir.layout import MANIFEST, RunPaths, checkpoint_name, step_of

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointInfo",
    "CheckpointManager",
    "find_checkpoint",
    "resume_plan",
]

log = logging.getLogger("kiln")

CHECKPOINT_FORMAT = 2  # the manifest format written; 1 (whole-file crc32s) is still read
_READABLE_FORMATS = (1, 2)
_PIECE = 32 << 20  # bytes of a file one thread hashes; the manifest records each piece's crc32
_BUFFER = 1 << 22  # read buffer per piece: small enough to stay in cache while crc32 reads it


def _crc_range(path: Path, start: int, length: int) -> int:
    """crc32 of `length` bytes of the file from `start`; OSError if the file is shorter."""
    buf = memoryview(bytearray(min(_BUFFER, max(length, 1))))
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0:
            n = f.readinto(buf[: min(len(buf), length)])
            if not n:
                raise OSError(f"{path}: shorter than expected while checksumming")
            crc = zlib.crc32(buf[:n], crc)  # continues the running crc: no combine needed
            length -= n
    return crc


def _hash_threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


class _Piece(NamedTuple):
    """A byte range of a file and its crc32 (hex) as the manifest records it."""

    start: int
    length: int
    crc32: str = ""


def _split(size: int, piece: int) -> list[_Piece]:
    """The pieces of a `size`-byte file, `piece` bytes each (the last one shorter)."""
    return [_Piece(start, min(piece, size - start)) for start in range(0, size, piece)]


def _hash(pool: ThreadPoolExecutor, path: Path, pieces: list[_Piece]) -> list[Future[int]]:
    return [pool.submit(_crc_range, path, p.start, p.length) for p in pieces]


def _recorded(manifest: dict[str, Any], where: Path, name: str) -> tuple[int, list[_Piece]]:
    """A file's size and pieces as its manifest entry records them.

    A format 1 entry holds one crc32 of the whole file: one piece, hashed in one pass.

    Raises:
        ValueError: the entry is malformed.
    """
    meta = manifest["files"][name]
    if isinstance(meta, dict) and type(meta.get("size")) is int and meta["size"] >= 0:
        size, piece = meta["size"], meta.get("piece")
        if manifest["format"] == 1:
            crcs, pieces = [meta.get("checksum")], [_Piece(0, size)]
        else:
            crcs = meta.get("crc32")
            ok = type(piece) is int and piece > 0 and isinstance(crcs, list)
            # The count first: a hostile tiny piece must not split a large file into millions.
            pieces = _split(size, piece) if ok and len(crcs) == -(-size // piece) else None
        if pieces is not None and all(isinstance(c, str) for c in crcs):
            return size, [p._replace(crc32=c) for p, c in zip(pieces, crcs, strict=True)]
    raise ValueError(f"{where}: malformed entry for {name} (size and checksums)")


def _mismatch(pieces: list[_Piece], hashing: list[Future[int]]) -> str | None:
    """What differs between a file's recorded piece crc32s and the computed ones, or None."""
    bad = []
    for i, (piece, future) in enumerate(zip(pieces, hashing, strict=True)):
        try:
            crc = future.result()
        except OSError:
            return "changed or unreadable while checksumming"
        if f"{crc:08x}" != piece.crc32.lower():
            bad.append(i)
    if not bad:
        return None
    if len(pieces) == 1:
        return "crc32 of the whole file differs from the manifest"
    first = pieces[bad[0]]
    more = f"; {len(bad) - 1} more piece(s) differ" if len(bad) > 1 else ""
    return (
        f"crc32 of piece {bad[0] + 1} of {len(pieces)}, bytes {first.start}-"
        f"{first.start + first.length - 1}, differs from the manifest{more}"
    )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Sealer:
    """fsyncs and checksums written files in background threads, while the next is written.

    One thread runs the fsyncs (each mostly waits on the disk); a pool hashes the pieces.
    Leaving the `with` block waits for (or cancels) whatever is still running, so nothing
    reads a staging directory after it is removed.
    """

    def __init__(self) -> None:
        self._sync = ThreadPoolExecutor(1, thread_name_prefix="kiln-fsync")
        self._hash = ThreadPoolExecutor(_hash_threads(), thread_name_prefix="kiln-crc")
        self._files: dict[str, tuple[int, int, Future[None], list[Future[int]]]] = {}

    def __enter__(self) -> _Sealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync.shutdown(wait=True, cancel_futures=True)
        self._hash.shutdown(wait=True, cancel_futures=True)

    def add(self, name: str, path: Path) -> None:
        """Start sealing a file whose writer has returned (it must not change any more)."""
        size, piece = path.stat().st_size, _PIECE
        synced = self._sync.submit(_fsync_file, path)
        self._files[name] = (size, piece, synced, _hash(self._hash, path, _split(size, piece)))

    def results(self) -> dict[str, dict[str, Any]]:
        """name -> manifest entry (size, piece, crc32s) once every file is fsynced and hashed;
        re-raises errors."""
        files = {}
        for name, (size, piece, synced, hashing) in self._files.items():
            synced.result()
            crcs = [f"{crc.result():08x}" for crc in hashing]
            files[name] = {"size": size, "piece": piece, "crc32": crcs}
        return files


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    config_hash: str = ""


class CheckpointManager:
    """Saves, lists, verifies and rotates checkpoints in one directory.

    Rotation keeps the `keep_last` newest checkpoints plus the `keep_best` best by `metric`
    (`mode` min or max); the newest complete checkpoint is never deleted.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        metric: str = "val_loss",
        mode: str = "min",
        enabled: bool = True,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.enabled = enabled

    # ---- reading ------------------------------------------------------------------------------

    def _read_manifest(self, path: Path) -> dict[str, Any] | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") not in _READABLE_FORMATS
            or not isinstance(manifest.get("files"), dict)
        ):
            return None
        return manifest

    def _info(self, path: Path, manifest: dict[str, Any]) -> CheckpointInfo:
        return CheckpointInfo(
            path=path,
            step=int(manifest["step"]),
            metrics=dict(manifest.get("metrics") or {}),
            config_hash=str(manifest.get("config_hash", "")),
        )

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints (a manifest whose files exist with the recorded sizes), by step."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if not path.is_dir() or step_of(path) is None:
                continue
            manifest = self._read_manifest(path)
            if manifest is None or not self._sizes_match(path, manifest):
                continue
            found.append(self._info(path, manifest))
        return sorted(found, key=lambda c: c.step)

    def _sizes_match(self, path: Path, manifest: dict[str, Any]) -> bool:
        for name, meta in manifest["files"].items():
            try:
                if (path / name).stat().st_size != meta["size"]:
                    return False
            except (OSError, KeyError, TypeError):  # TypeError: a malformed entry
                return False
        return True

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def verify(self, path: Path, *, checksums: bool = True) -> CheckpointInfo:
        """Check every file of the checkpoint at `path` against its manifest: its size, then
        (unless `checksums` is False: what `kiln.preflight` asks, before loading anything) the
        crc32 of each piece (of the whole file, for a format 1 manifest).

        Raises:
            ValueError: naming what is missing or corrupt (for a piece, its byte range).
        """
        path = Path(path)
        manifest = self._read_manifest(path)
        if manifest is None:
            raise ValueError(f"{path}: not a complete kiln checkpoint (no valid {MANIFEST})")
        files = {name: _recorded(manifest, path / MANIFEST, name) for name in manifest["files"]}
        for name, (size, _) in files.items():
            file = path / name
            if not file.is_file():
                raise ValueError(f"{file}: missing from the checkpoint")
            found = file.stat().st_size
            if found != size:
                raise ValueError(f"{file}: corrupt ({found} bytes, the manifest records {size})")
        if not checksums:
            return self._info(path, manifest)
        pool = ThreadPoolExecutor(_hash_threads(), thread_name_prefix="kiln-crc")
        try:
            # Every piece of every file is queued at once, so all threads stay busy.
            hashing = {
                name: _hash(pool, path / name, pieces) for name, (_, pieces) in files.items()
            }
            for name, (_, pieces) in files.items():
                problem = _mismatch(pieces, hashing[name])
                if problem:
                    raise ValueError(f"{path / name}: corrupt ({problem})")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, skip what is queued
        return self._info(path, manifest)

    def incomplete(self) -> list[Path]:
        """Directories here that are not complete checkpoints (staging leftovers, torn writes)."""
        if not self.root.is_dir():
            return []
        complete = {c.path for c in self.list()}
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_dir()
            and p not in complete
            and (p.name.startswith(".") or step_of(p) is not None)
        )

    def clean_incomplete(self) -> list[Path]:
        """Remove and report incomplete checkpoint directories (left by a crash)."""
        removed = self.incomplete() if self.enabled else []
        for path in removed:
            log.warning("removing incomplete checkpoint %s (interrupted write)", path)
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # ---- writing ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        writers: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        config_hash: str = "",
        staging: Path | None = None,
    ) -> Path:
        """Write a checkpoint for `step` atomically, then rotate.

        Args:
            step: the optimizer step the checkpoint captures.
            writers: file name -> callable(path) that writes that file.
            metrics: metrics at this step (ranks the checkpoint for keep_best).
            config_hash: hash of the config that wrote it.
            staging: a directory from `stage(step)` that already holds files written by
                others (every rank's DCP shards under FSDP); they are sealed and listed in the
                manifest with the rest. None: a new one.

        Returns:
            The final directory `step-<step>`.
        """
        final = self.root / checkpoint_name(step)
        if not self.enabled:
            return final
        # Disk full: one clear line (the staging directory is removed; older checkpoints stay).
        with writing(f"checkpoint {final}"):
            if staging is None:
                staging = self.stage(step)
            try:
                with _Sealer() as sealer:
                    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
                        sealer.add(file.relative_to(staging).as_posix(), file)  # shards
                    for name, write in writers.items():
                        target = staging / name
                        write(target)
                        sealer.add(name, target)  # fsync + crc32 in the background
                    files = sealer.results()
                manifest = {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "created": time.time(),
                    "config_hash": config_hash,
                    "metrics": metrics or {},
                    "files": files,
                }
                with open(staging / MANIFEST, "w") as f:
                    f.write(json_text(manifest, indent=2))  # strict JSON: a NaN metric is null
                    f.flush()
                    os.fsync(f.fileno())
                for sub in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:
                    fsync_dir(sub)
                if final.exists():  # an earlier write of the same step (e.g. before a crash)
                    shutil.rmtree(final)
                os.replace(staging, final)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.rotate()
        return final

    def stage(self, step: int) -> Path:
        """A new, empty staging directory for the checkpoint of `step` (hidden: a crash leaves
        it to `clean_incomplete`); `save(..., staging=...)` completes it."""
        with writing(f"checkpoint {self.root / checkpoint_name(step)}"):
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging-step-{step}-{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
        return staging

    def rotate(self) -> list[Path]:
        """Delete checkpoints beyond keep_last newest + keep_best best; returns what went."""
        found = self.list()
        if not found:
            return []
        keep = {c.path for c in found[-self.keep_last :]}
        keep.add(found[-1].path)  # never the newest complete one
        if self.keep_best:
            ranked = [c for c in found if self.metric in c.metrics]
            ranked.sort(key=lambda c: c.metrics[self.metric], reverse=self.mode == "max")
            keep.update(c.path for c in ranked[: self.keep_best])
        removed = [c.path for c in found if c.path not in keep]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def best(self) -> CheckpointInfo | None:
        """The best complete checkpoint by `metric`, or None when none has it."""
        ranked = [c for c in self.list() if self.metric in c.metrics]
        if not ranked:
            return None
        pick = min if self.mode == "min" else max
        return pick(ranked, key=lambda c: c.metrics[self.metric])


# ---- what `--resume` names ---------------------------------------------------------------------


def find_checkpoint(
    want: str | Path | bool, checkpoints: CheckpointManager, *, checksums: bool = True
) -> Path | None:
    """The complete checkpoint `want` names: False none; True or "latest" the newest complete
    one of the run (`checkpoints`: its own; an error if there is none); "auto" the same or
    None; a path: a checkpoint, or a run directory (its newest complete one). Each is
    verified (`CheckpointManager.verify`; with `checksums` False, its manifest and file sizes
    only: `kiln.preflight`'s check before loading anything). None: nothing to resume.

    Raises:
        KilnError: naming --resume: nothing complete where a checkpoint is required.
    """
    if want is False:
        return None
    if want in (True, "latest", "auto"):
        return _newest_valid(checkpoints, required=want != "auto", checksums=checksums)
    path = resolve_path(want, "--resume")  # type: ignore[arg-type]
    if not (path / MANIFEST).exists() and RunPaths(path).checkpoints.is_dir():
        run = CheckpointManager(RunPaths(path).checkpoints)
        return _newest_valid(run, required=True, checksums=checksums)
    try:
        return checkpoints.verify(path, checksums=checksums).path
    except ValueError as exc:
        raise KilnError(f"--resume: {exc}") from None


def resume_plan(
    want: str | Path | bool,
    checkpoints: CheckpointManager,
    run_dir: Path,
    *,
    checksums: bool = True,
) -> tuple[Path | None, bool, str | None]:
    """How a run in `run_dir` (resolved; `checkpoints` are its own) starts, given `want`:
    (the checkpoint it resumes from; whether that belongs to another run, which starts this
    run directory afresh from it; the reason added to the refusal when the run directory
    must hold no run, `kiln.runs.held_run`: "" for a fresh start, None when the run
    continues there and may).

    Raises:
        KilnError: `find_checkpoint`'s, or a checkpoint inside `run_dir` that is not one of
            its checkpoints.
    """
    resume_from = find_checkpoint(want, checkpoints, checksums=checksums)
    if resume_from is None:
        return None, False, ""
    if is_within(resume_from, checkpoints.root.resolve()):
        return resume_from, False, None
    if is_within(resume_from, run_dir):
        raise KilnError(
            f"--resume: {resume_from} lies inside output_dir {run_dir} but "
            "is not one of its checkpoints; resume that run itself"
        )
    why = (
        f", and --resume {resume_from} is a checkpoint of another run "
        f"(resume that run itself, or start this one afresh from it)"
    )
    return resume_from, True, why


def _newest_valid(
    manager: CheckpointManager, *, required: bool, checksums: bool = True
) -> Path | None:
    """Newest checkpoint that passes its checks; one that fails is skipped, and said so."""
    for info in reversed(manager.list()):
        try:
            return manager.verify(info.path, checksums=checksums).path
        except ValueError as exc:
            log.warning("skipping checkpoint: %s", exc)
    if required:
        raise KilnError(f"--resume: no complete checkpoint in {manager.root}")
    return None
