"""`ShardWriter`: documents of token ids in, a shard set (see `format.py`) out, in bounded memory.

The writer streams the current shard's tokens (and label masks) to temporary files through a
small staging buffer (`STAGE_TOKENS`), hashing them as they go, and keeps only the documents'
end offsets (8 bytes a document) in memory; a shard is complete when the next document would
overflow it: its files are fsynced and renamed into place (atomic: a reader never sees a torn
file), then its `.done` marker; `close()` writes `manifest.json` last. Memory is the same
whatever `shard_tokens` and the corpus size. Shard boundaries
depend only on the documents and `shard_tokens`, so a writer killed at any moment and resumed
(`ShardWriter.resume`, skipping `documents_written` documents) writes the same bytes as one that
was never interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kiln.data.shards.format import (
    DONE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MASK,
    MASK_DTYPE,
    OFFSET_DTYPE,
    OFFSETS,
    TOKENS,
    dtype_for,
    shard_name,
)
from kiln.errors import KilnError
from kiln.files import RunLock, fsync_dir, json_text, write_atomic, writing

__all__ = ["DEFAULT_SHARD_TOKENS", "SetComplete", "ShardWriter"]

DEFAULT_SHARD_TOKENS = 1 << 26
"""64M tokens a shard: 128 MiB of uint16 ids, a few hundred shards for 10B tokens."""

STAGE_TOKENS = 1 << 20
"""Tokens gathered in memory before a write to the shard's file (2-4 MiB, masks aside)."""


def write_chunk(file: BinaryIO, path: Path, data: memoryview) -> None:
    """One write to the shard file streamed to `file` (`path`: its final name)."""
    file.write(data)


class _ShardFile:
    """One file of the shard being written: streamed to a temporary name beside it (which a
    new writer of the set removes), hashed as it goes, renamed into place by `finish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.hash = hashlib.sha256()
        self.nbytes = 0
        with writing(f"the token shard {path}"):
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish or discard)

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")  # no copy of the array
        with writing(f"the token shard {self.path}"):
            write_chunk(self.file, self.path, data)
        self.hash.update(data)
        self.nbytes += data.nbytes

    def finish(self, durable: bool) -> dict[str, Any]:
        """Flush, fsync (if `durable`) and rename into place; the manifest entry."""
        with writing(f"the token shard {self.path}"):
            self.file.flush()
            if durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        return {"name": self.path.name, "bytes": self.nbytes, "sha256": self.hash.hexdigest()}

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class SetComplete(KilnError):
    """The shard set a writer was made for is already complete (it has its manifest)."""


class ShardWriter:
    """Writes documents (token id sequences) into the shard set at `directory`.

    A shard holds at most `shard_tokens` tokens and at most `shard_tokens` documents (so empty
    documents cannot grow the offsets without bound); a document longer than `shard_tokens`
    gets a shard of its own, written straight from the caller's array.

    Args:
        directory: the shard set's directory (made if missing). A fresh writer removes the
            shard files an earlier, unfinished writer left there; `resume` keeps them.
        vocab_size: ids are in [0, vocab_size); decides uint16 or uint32.
        key: the content key (`shard_key`), recorded in the manifest.
        tokenizer_fingerprint: recorded in the manifest, checked by `ShardSet.open`.
        shard_tokens: the size bound of a shard, in tokens.
        with_masks: write a per-token label mask (instruction, seq2seq) beside each shard.
        durable: fsync each file (off only for throwaway sets, e.g. in tests).
        resume: keep the complete shards an interrupted writer left (see `resume`).
        wait: another process writing the set: wait for it (a log line names it) instead
            of refusing; then `SetComplete` if it completed the set.

    Raises:
        KilnError: another process writes the set (without `wait`); `SetComplete`: the set
            has its manifest.
    """

    def __init__(
        self,
        directory: str | Path,
        vocab_size: int,
        key: str,
        tokenizer_fingerprint: str | None,
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        with_masks: bool = False,
        durable: bool = True,
        resume: bool = False,
        wait: bool = False,
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, not {shard_tokens}")
        self.directory = Path(directory)
        self.header: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype_for(vocab_size).name,
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "key": key,
            "shard_tokens": shard_tokens,
            "has_masks": with_masks,
        }
        self.shard_tokens = shard_tokens
        self.durable = durable
        self._dtype = dtype_for(vocab_size)
        # The current shard: its files being streamed, a small staging buffer of tokens and
        # masks, and the documents' end offsets (grown by doubling: long documents need few).
        self._files: dict[str, _ShardFile] = {}
        stage = min(shard_tokens, STAGE_TOKENS)
        self._stage = np.empty(stage, dtype=self._dtype)
        self._stage_mask = np.empty(stage if with_masks else 0, dtype=MASK_DTYPE)
        self._staged = 0
        self._ends = np.empty(min(shard_tokens, 1024), dtype=OFFSET_DTYPE)
        self._fill = 0
        self._docs = 0
        self.shards: list[dict[str, Any]] = []
        """The manifest entries of the shards written so far."""
        self.closed = False
        with writing(f"the shard set {self.directory}"):
            self.directory.mkdir(parents=True, exist_ok=True)
        # Two writers of one set would interleave shards: the second waits or is refused,
        # naming the first.
        self._lock = RunLock(self.directory, what="shard set").acquire(wait=wait)
        try:
            with writing(f"the shard set {self.directory}"):
                if (self.directory / MANIFEST).exists():
                    raise SetComplete(
                        f"{self.directory / MANIFEST}: the shard set is already complete; "
                        "remove the directory to write it again"
                    )
                if resume:
                    self._keep_done_shards()
                else:
                    self._remove_from(0)
        except BaseException:
            self._lock.release()
            raise

    # ---- starting ----------------------------------------------------------------------------

    @classmethod
    def resume(
        cls, directory: str | Path, vocab_size: int, key: str, *args: Any, **kw: Any
    ) -> ShardWriter:
        """A writer that keeps the complete shards an interrupted writer left in `directory`.

        Same arguments as the constructor, which must match the interrupted writer's (a
        shard written with other settings is an error naming its marker). The caller skips
        the first `documents_written` documents and adds the rest.
        """
        return cls(directory, vocab_size, key, *args, resume=True, **kw)

    def _keep_done_shards(self) -> None:
        index = 0
        while (marker := self.directory / f"{shard_name(index)}{DONE}").exists():
            try:
                done = json.loads(marker.read_text())
                if not isinstance(done, dict):
                    raise ValueError("not a JSON object")
                header, entry = done["header"], done["shard"]
                if header != self.header:
                    raise KilnError(
                        f"{marker}: this shard was written with other settings "
                        f"({_diff(header, self.header)}); remove {self.directory} to start again"
                    )
                files = [(self.directory / f["name"], f["bytes"]) for f in entry["files"].values()]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise KilnError(f"{marker}: unreadable shard marker ({exc!r})") from None
            if not all(path.is_file() and path.stat().st_size == size for path, size in files):
                break  # a shard whose files are gone or short: write it again from here
            self.shards.append(entry)
            index += 1
        self._remove_from(index)

    def _remove_from(self, index: int) -> None:
        """Remove the files of shards `index` and later (an unfinished writer's leftovers)."""
        for path in self.directory.glob("shard-*"):
            stem = path.name.split(".")[0]
            if stem[6:].isdigit() and int(stem[6:]) >= index:
                path.unlink()
        for path in self.directory.glob(".shard-*.tmp-*"):  # write_atomic's temporary files
            path.unlink()

    # ---- writing -----------------------------------------------------------------------------

    @property
    def documents_written(self) -> int:
        """Documents held by complete shards on disk (a resumed caller skips this many)."""
        return sum(s["documents"] for s in self.shards)

    def empty_documents_written(self) -> int:
        """Empty documents held by complete shards on disk (read from their offsets files)."""
        empty = 0
        for entry in self.shards:
            path = self.directory / entry["files"][OFFSETS[1:]]["name"]
            with writing(f"the token shard {path}"):
                offsets = np.fromfile(path, dtype=OFFSET_DTYPE)
            empty += int(np.count_nonzero(np.diff(offsets) == 0))
        return empty

    @property
    def documents(self) -> int:
        """Documents added so far, the buffered ones included."""
        return self.documents_written + self._docs

    @property
    def buffer_nbytes(self) -> int:
        """Bytes the writer holds: the staging buffer (at most `STAGE_TOKENS` tokens and their
        masks) and the current shard's documents' end offsets."""
        return self._stage.nbytes + self._stage_mask.nbytes + self._ends.nbytes

    @property
    def buffered_tokens(self) -> int:
        """Tokens of the current shard, not yet in a complete shard."""
        return self._fill

    def add(self, doc_tokens: Sequence[int] | np.ndarray, labels_mask: Any = None) -> None:
        """Append one document: its token ids and, for a set with masks, its label mask
        (1 where the token is trained on; None: every token)."""
        if self.closed:
            raise ValueError("ShardWriter.add after close()")
        tokens = np.asarray(doc_tokens)
        if tokens.ndim != 1:
            raise ValueError(f"a document is a 1-d sequence of token ids, not shape {tokens.shape}")
        if tokens.size and tokens.dtype.kind not in "iu":
            raise ValueError(f"token ids are integers, not {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.header["vocab_size"]):
            raise ValueError(
                f"token id out of range [0, {self.header['vocab_size']}): "
                f"{int(tokens.min())}..{int(tokens.max())}"
            )
        mask = self._mask_of(tokens, labels_mask)
        n = tokens.size
        if self._fill + n > self.shard_tokens or self._docs == self.shard_tokens:
            self._flush()
        if n > self.shard_tokens:  # a document bigger than a shard: a shard of its own
            self._append(tokens.astype(self._dtype), mask)
            self._fill, self._ends[0], self._docs = n, n, 1
            self._flush()
            return
        self._append(tokens, mask)
        self._fill += n
        if self._docs == self._ends.size:
            grown = np.empty(min(2 * self._ends.size, self.shard_tokens), dtype=OFFSET_DTYPE)
            grown[: self._docs] = self._ends
            self._ends = grown
        self._ends[self._docs] = self._fill
        self._docs += 1

    def _append(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        """The document's tokens (and mask) after the current shard's: staged, or written
        through when they do not fit the staging buffer."""
        if not self._files:
            stem = shard_name(len(self.shards))
            suffixes = (TOKENS, MASK) if self.header["has_masks"] else (TOKENS,)
            self._files = {s: _ShardFile(self.directory / f"{stem}{s}") for s in suffixes}
        n = tokens.size
        if self._staged + n > self._stage.size:
            self._write_stage()
        if n > self._stage.size:
            self._files[TOKENS].write(tokens.astype(self._dtype, copy=False))
            if mask is not None:
                self._files[MASK].write(mask)
            return
        self._stage[self._staged : self._staged + n] = tokens
        if mask is not None:
            self._stage_mask[self._staged : self._staged + n] = mask
        self._staged += n

    def _write_stage(self) -> None:
        if self._staged:
            self._files[TOKENS].write(self._stage[: self._staged])
            if self.header["has_masks"]:
                self._files[MASK].write(self._stage_mask[: self._staged])
            self._staged = 0

    def _mask_of(self, tokens: np.ndarray, labels_mask: Any) -> np.ndarray | None:
        if not self.header["has_masks"]:
            if labels_mask is not None:
                raise ValueError("a label mask given to a ShardWriter made with with_masks=False")
            return None
        if labels_mask is None:
            return np.ones(tokens.size, dtype=MASK_DTYPE)
        mask = np.asarray(labels_mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"label mask of shape {mask.shape} for {tokens.size} tokens")
        return (mask != 0).astype(MASK_DTYPE)

    def _flush(self) -> None:
        """Complete the current shard: its files in place, then its marker."""
        if self._docs == 0:
            return
        stem = shard_name(len(self.shards))
        self._write_stage()
        offsets = np.empty(self._docs + 1, dtype=OFFSET_DTYPE)
        offsets[0] = 0
        offsets[1:] = self._ends[: self._docs]
        self._files[OFFSETS] = _ShardFile(self.directory / f"{stem}{OFFSETS}")
        self._files[OFFSETS].write(offsets)
        files = {}
        for suffix in (TOKENS, OFFSETS, MASK):  # (the manifest's order of a shard's files)
            if suffix in self._files:
                files[suffix[1:]] = self._files[suffix].finish(self.durable)
        self._files = {}
        entry = {
            "name": stem,
            "documents": int(self._docs),
            "tokens": int(self._fill),
            "files": files,
        }
        marker = self.directory / f"{stem}{DONE}"
        with writing(f"the token shard marker {marker}"):
            write_atomic(
                marker, json_text({"header": self.header, "shard": entry}), durable=self.durable
            )
            if self.durable:
                fsync_dir(self.directory)
        self.shards.append(entry)
        self._fill = 0
        self._docs = 0

    def close(self) -> dict[str, Any]:
        """Write the last shard and `manifest.json` (atomically, last); returns the manifest."""
        if self.closed:
            raise ValueError("ShardWriter.close called twice")
        self._flush()
        manifest = {
            **self.header,
            "documents": self.documents_written,
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }
        path = self.directory / MANIFEST
        with writing(f"the shard manifest {path}"):
            write_atomic(path, json_text(manifest, indent=1) + "\n", durable=self.durable)
            if self.durable:
                fsync_dir(self.directory)
        self.closed = True
        for index in range(len(self.shards)):  # the markers' job is done once the manifest is
            with contextlib.suppress(OSError):
                (self.directory / f"{shard_name(index)}{DONE}").unlink()
        self._lock.release()
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and not self.closed:
            self.close()
        self.stop()

    def stop(self) -> None:
        """Stop without finishing: the complete shards stay for `resume`, the current one's
        temporary files go, no manifest is written, the directory's lock is released (`with`
        does this on an error)."""
        files, self._files = self._files, {}
        for file in files.values():
            file.discard()
        self._lock.release()


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then {new.get(k)!r}" for k in changed)
