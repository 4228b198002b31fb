"""CheckpointManager: atomic, verified, rotated checkpoints under `<run>/checkpoints/`.

A checkpoint is written into a staging directory, every file is fsynced, a manifest (files,
sizes, checksums, step, config hash) is written last, and the directory is renamed into place
as `step-<N>/`. A directory without a valid manifest is never loaded: a crash at any moment
leaves either the old set of checkpoints or the old set plus one complete new one.

Files of one checkpoint:
    model.safetensors     trainable weights (all of them; only the adapters under LoRA)
    optimizer.pt          optimizer state_dict
    rng.pt                python, numpy, torch CPU and CUDA RNG states
    trainer_state.json    TrainState, pending losses, loss history, eval history, grad scaler,
                          callback and component states
    config.yaml           the resolved config that wrote it
    manifest.json         written last; its presence and checksums make the checkpoint valid

Saving overlaps the work: while the next file is written, background threads fsync the files
already written and crc32 them, in pieces hashed in parallel and combined into the crc32 of the
whole file. The manifest still goes last, after every fsync and checksum has finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.files import writing

__all__ = ["CHECKPOINT_FORMAT", "CheckpointInfo", "CheckpointManager", "fsync_dir"]

log = logging.getLogger("kiln")

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_PIECE = 32 << 20  # bytes of a file one thread hashes; pieces combine into the file's crc32
_BUFFER = 1 << 22  # read buffer per piece: small enough to stay in cache while crc32 reads it
_CRC_POLY = 0xEDB88320  # crc32's polynomial, bit-reversed


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _crc_multmodp(a: int, b: int) -> int:
    """a * b modulo crc32's polynomial, over GF(2) (zlib's multmodp; a != 0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _crc_x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _crc_multmodp(p, p)
    return table  # table[k] = x^(2^k)


_CRC_X2N = _crc_x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    p, k = 1 << 31, 3  # p = x^0; shift crc1 by x^(8 * len2)
    while len2:
        if len2 & 1:
            p = _crc_multmodp(_CRC_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _crc_multmodp(p, crc1) ^ crc2


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
            crc = zlib.crc32(buf[:n], crc)
            length -= n
    return crc


def _hash_threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


class _Checksum:
    """A file's crc32 being computed in a thread pool, piece by piece."""

    def __init__(self, pool: ThreadPoolExecutor, path: Path, size: int) -> None:
        self.pieces: list[tuple[int, Future[int]]] = [
            (n, pool.submit(_crc_range, path, start, n))
            for start in range(0, size, _PIECE)
            for n in (min(_PIECE, size - start),)
        ]

    def result(self) -> str:
        crc = 0
        for n, piece in self.pieces:
            crc = crc32_combine(crc, piece.result(), n)
        return f"{crc:08x}"


def file_checksum(path: Path) -> str:
    """crc32 of a file, hex: catches truncation and corruption at disk speed.

    Pieces of a large file are hashed in parallel threads (zlib releases the GIL).
    """
    size = Path(path).stat().st_size
    if size <= _PIECE:
        return f"{_crc_range(path, 0, size):08x}"
    with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="kiln-crc") as pool:
        return _Checksum(pool, path, size).result()


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
        self._files: dict[str, tuple[int, Future[None], _Checksum]] = {}

    def __enter__(self) -> _Sealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync.shutdown(wait=True, cancel_futures=True)
        self._hash.shutdown(wait=True, cancel_futures=True)

    def add(self, name: str, path: Path) -> None:
        """Start sealing a file whose writer has returned (it must not change any more)."""
        size = path.stat().st_size
        synced = self._sync.submit(_fsync_file, path)
        self._files[name] = (size, synced, _Checksum(self._hash, path, size))

    def results(self) -> dict[str, dict[str, Any]]:
        """name -> {size, checksum} once every file is fsynced and hashed; re-raises errors."""
        files = {}
        for name, (size, synced, checksum) in self._files.items():
            synced.result()
            files[name] = {"size": size, "checksum": checksum.result()}
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
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
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
            if not path.is_dir() or not _STEP_DIR.fullmatch(path.name):
                continue
            manifest = self._read_manifest(path)
            if manifest is None or not self._sizes_match(path, manifest):
                continue
            found.append(self._info(path, manifest))
        return sorted(found, key=lambda c: c.step)

    def _sizes_match(self, path: Path, manifest: dict[str, Any]) -> bool:
        for name, meta in manifest.get("files", {}).items():
            try:
                if (path / name).stat().st_size != meta["size"]:
                    return False
            except OSError:
                return False
        return True

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def verify(self, path: Path) -> CheckpointInfo:
        """Check every file of the checkpoint at `path` against its manifest.

        Raises:
            ValueError: naming what is missing or corrupt.
        """
        path = Path(path)
        manifest = self._read_manifest(path)
        if manifest is None:
            raise ValueError(f"{path}: not a complete kiln checkpoint (no valid {MANIFEST})")
        files = manifest["files"]
        for name, meta in files.items():
            file = path / name
            if not file.is_file():
                raise ValueError(f"{file}: missing from the checkpoint")
            if file.stat().st_size != meta["size"]:
                raise ValueError(f"{file}: corrupt (size or checksum differs from the manifest)")
        found: dict[str, str | None] = {}
        with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="kiln-crc") as pool:
            # Every piece of every file is queued at once, so all threads stay busy.
            pending = {
                name: _Checksum(pool, path / name, meta["size"]) for name, meta in files.items()
            }
            for name, checksum in pending.items():
                try:
                    found[name] = checksum.result()
                except OSError:  # shrank since the size check
                    found[name] = None
        for name, meta in files.items():
            if found[name] != meta["checksum"]:
                raise ValueError(
                    f"{path / name}: corrupt (size or checksum differs from the manifest)"
                )
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
            and (p.name.startswith(".") or _STEP_DIR.fullmatch(p.name))
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
    ) -> Path:
        """Write a checkpoint for `step` atomically, then rotate.

        Args:
            step: the optimizer step the checkpoint captures.
            writers: file name -> callable(path) that writes that file.
            metrics: metrics at this step (ranks the checkpoint for keep_best).
            config_hash: hash of the config that wrote it.

        Returns:
            The final directory `step-<step>`.
        """
        final = self.root / f"step-{step}"
        if not self.enabled:
            return final
        # Disk full: one clear line (the staging directory is removed; older checkpoints stay).
        with writing(f"checkpoint {final}"):
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging-step-{step}-{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            try:
                with _Sealer() as sealer:
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
                    json.dump(manifest, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(staging)
                if final.exists():  # an earlier write of the same step (e.g. before a crash)
                    shutil.rmtree(final)
                os.replace(staging, final)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.rotate()
        return final

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
