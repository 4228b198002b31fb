"""The one place that resolves the paths a user gives and writes into a run directory.

- `resolve_path` turns a user path into an absolute one with `..` and symlinks resolved *before*
  any check, so `runs/missing/../b` is checked as `runs/b` (what the OS will write to).
- `expand_source` turns a data source spec (a file, a glob, a saved dataset, `hf:<name>`) into
  the sources it stands for, and `looks_local` tells a model path from a hub id: the rules the
  data pipeline and the model loader apply, here (no torch) so `kiln.preflight` applies the
  same ones before anything heavy loads.
- `write_atomic` writes a file under a temporary name, fsyncs it and renames it into place: a
  reader (or a crash) sees the old file or the new one, never half of one. Files that may hold
  the config (config.yaml, kiln_config.yaml) are written with mode 0600 (`private=True`).
- `RunLock` is an exclusive lock on a run directory (`flock` on `<dir>/.kiln.lock`), taken by
  `kiln train` (fresh or resumed) and `kiln merge`, so two processes never write one run. The
  kernel drops an flock when its process dies, so a lock left by a killed process is never in
  the way; the pid in the file only names the live holder in the refusal.
- `json_text` is the JSON of every file kiln writes in a run directory: strict JSON, so a value
  that is not a finite number (NaN, inf: a diverging loss) is written `null`, never Python's
  bare `NaN`, which JSON parsers other than Python's refuse.
- `storage_full` recognizes "the disk is full" however the writing library reported it, and
  `writing(what)` turns it into `StorageFull`, which the CLI prints as one line naming what was
  being written (exit code `kiln.runs.ExitCode.STORAGE_FULL`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kiln.errors import DataError, KilnError

__all__ = [
    "HF_PREFIX",
    "LOCK_FILE",
    "PRIVATE_MODE",
    "RunLock",
    "StorageFull",
    "expand_source",
    "finite_json",
    "fsync_dir",
    "fsync_tree",
    "is_saved_dataset",
    "is_within",
    "json_text",
    "looks_local",
    "resolve_path",
    "storage_full",
    "swap_dir",
    "torch_save",
    "write_atomic",
    "writing",
]

LOCK_FILE = ".kiln.lock"
PRIVATE_MODE = 0o600
"""Mode of files that may hold the config: only the owner reads them."""

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Rust libraries (safetensors, tokenizers) report the OS error only in their message.
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def resolve_path(path: str | os.PathLike[str], key: str = "path") -> Path:
    """`path` made absolute, `~` expanded, `..` and symlinks resolved (it need not exist).

    Raises:
        KilnError: naming `key` when the path cannot be resolved (a symlink loop, a NUL byte).
    """
    try:
        return Path(os.fspath(path)).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise KilnError(f"{key}: cannot resolve {str(path)!r}: {exc}") from None


def is_within(path: Path, parent: Path) -> bool:
    """Whether resolved `path` is `parent` or lies inside it."""
    return path == parent or parent in path.parents


HF_PREFIX = "hf:"
"""A data source spec naming a Hugging Face hub dataset: `hf:<name>`."""
_GLOB_CHARS = re.compile(r"[*?[]")
# Files `save_to_disk` writes: a Dataset has the first two, a DatasetDict the third.
_SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


def expand_source(spec: str | os.PathLike[str]) -> list[str]:
    """The sources one data spec stands for: a glob's sorted matches (`**` allowed), else the
    spec itself (a file, a directory, `hf:<name>`; whether it exists is not checked here).

    Raises:
        DataError: a glob that matches nothing.
    """
    spec = str(spec)
    if spec.startswith(HF_PREFIX) or not _GLOB_CHARS.search(spec) or Path(spec).exists():
        return [spec]
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise DataError(f"{spec}: no files match this pattern")
    return matches


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory holding a `datasets` dataset written by `save_to_disk`."""
    return path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES)


def looks_local(name_or_path: str) -> bool:
    """Whether a model or tokenizer name is meant as a filesystem path rather than a hub id
    ("org/name"): it starts with `/`, `.` or `~`, or holds a backslash or more than one `/`.

    Checked before asking the hub, which retries an unreachable host for ~20 s.
    """
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def finite_json(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, inf, -inf) replaced by None, in the
    dicts, lists and tuples it holds: what JSON can carry (as `null`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def json_text(data: Any, *, indent: int | None = None) -> str:
    """`data` as strict JSON: non-finite numbers are `null` (see `finite_json`)."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False)


def write_atomic(
    path: Path, data: str | bytes, *, private: bool = False, durable: bool = True
) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename); 0600 if `private`.

    `durable=False` skips the fsync: readers still never see a torn file, but a power cut may
    lose the latest version (for files rewritten every few seconds, like status.json).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, PRIVATE_MODE if private else 0o666)
        with open(fd, "wb") as f:
            if private:  # an older file of that name may have had a wider mode
                os.fchmod(f.fileno(), PRIVATE_MODE)
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


def fsync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable (before it is renamed into place)."""
    for path in sorted(root.rglob("*"), reverse=True):  # files before their directories
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


def swap_dir(staged: Path, target: Path, parked: Path) -> None:
    """Rename the directory `staged` to `target` (same filesystem). An existing `target` is
    moved to `parked` first and put back if the rename fails; the caller removes `parked`."""
    had_old = os.path.lexists(target)
    if had_old:
        os.replace(target, parked)
    try:
        os.replace(staged, target)
    except BaseException:
        if had_old:
            os.replace(parked, target)  # put the user's directory back as it was
        raise
    fsync_dir(target.parent)


class _RecordingFile:
    """An unbuffered file that remembers the OSError of a failed write.

    torch.save reports a failed write as `RuntimeError: unexpected pos ...`, which says nothing
    about space; the recorded error is re-raised instead.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int | None:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)`, whose write errors keep their errno (disk full stays legible)."""
    import torch

    with open(path, "wb", buffering=0) as f:
        recording = _RecordingFile(f)
        try:
            torch.save(obj, recording)  # type: ignore[arg-type]
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise


def storage_full(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` when it means the disk, quota or file-size limit ran out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return current
        match = _OS_ERROR_IN_TEXT.search(str(current))
        if match and int(match.group(1)) in _FULL_ERRNOS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


class StorageFull(Exception):
    """The disk filled up while kiln was writing `what`; what was already written is intact."""

    def __init__(self, what: str, error: OSError) -> None:
        self.what = what
        self.error = error
        self.last_checkpoint: Path | None = None
        """The newest complete checkpoint of the run (set by the trainer), to resume from."""
        self.resume_hint: str | None = None
        """How to continue, where that is not a checkpoint (e.g. set by `kiln data prepare`)."""
        super().__init__(self.message())

    def message(self) -> str:
        """One line: what ran out, while writing what, and where to continue from."""
        reason = {
            errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit exceeded",
        }.get(self.error.errno or 0, "no space left on device")
        if self.resume_hint is not None:
            where = self.resume_hint
        elif self.last_checkpoint is not None:
            where = f"the last complete checkpoint is {self.last_checkpoint}"
        else:
            where = "no checkpoint was written yet"
        return f"{reason} while writing {self.what}; {where}"


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into `StorageFull(what)`."""
    try:
        yield
    except StorageFull:
        raise
    except Exception as exc:
        full = storage_full(exc)
        if full is None:
            raise
        raise StorageFull(what, full) from exc


class RunLock:
    """An exclusive lock on a directory, held while a process trains or merges into it.

    Raises KilnError (one line naming the holder's pid) when another process holds it.
    """

    def __init__(self, directory: Path, *, what: str = "run directory") -> None:
        self.directory = directory
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self, *, wait: bool = False) -> RunLock:
        """Take the lock (the directory must exist). `wait`: when another process holds it,
        log one line naming it and wait until it lets go, instead of refusing."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if wait:
                logging.getLogger("kiln").info(
                    "waiting for pid %s, which is using the %s %s",
                    holder,
                    self.what,
                    self.directory,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                return self._hold(fd)
            os.close(fd)
            raise KilnError(
                f"{self.directory}: another kiln process (pid {holder}) is using this "
                f"{self.what}; wait for it to finish or stop it first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return self._hold(fd)

    def _hold(self, fd: int) -> RunLock:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a process taking it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
