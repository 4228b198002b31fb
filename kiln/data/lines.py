"""Reading data files by line: line numbers for messages, bounded line sizes, progress; and the
offsets of a JSON file's items, so a bad item of a .json file is named by its line.

A file is read one line at a time, so memory holds the rows made so far, not the file's lines
too, and a line over a size limit is skipped in bounded blocks, never held whole.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from kiln.data.progress import Progress
from kiln.errors import DataError

__all__ = [
    "COMPRESSED",
    "array_starts",
    "data_array_start",
    "decoded_lines",
    "file_error",
    "open_binary",
    "raw_lines",
    "skip_ws",
    "whole_text",
]

# Lines between two progress checks (a clock read) while reading a file.
_PROGRESS_LINES = 4096


def file_error(path: Path, exc: OSError) -> DataError:
    """A one-line DataError for a file that cannot be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{path}: is a directory, expected a file")
    return DataError(f"{path}: cannot read ({exc.strerror or exc})")  # or: not gzip data


COMPRESSED = (".gz", ".zst")
"""Suffixes of compressed files, decompressed as they are read (`open_binary`)."""


def open_binary(path: Path) -> BinaryIO:
    """`path` opened for reading bytes: `.gz` through gzip, `.zst` through `zstandard` (when
    installed), other files as they are.

    Raises:
        OSError: the file cannot be opened.
        DataError: a `.zst` file without the `zstandard` package.
    """
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst files needs the zstandard package (pip install zstandard)"
            ) from None
        return zstandard.open(path, "rb")  # type: ignore[no-any-return]
    return path.open("rb")


def raw_lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes with the line break) of each line, read one line at a time.

    A line of more than `max_bytes` bytes (without its break) is read past in bounded blocks
    and given as None, so a huge line is never held in memory. A slow read logs progress.
    """
    try:
        # The progress total is in bytes read: unknown (None) for a compressed file.
        total = 0 if path.suffix.lower() in COMPRESSED else path.stat().st_size
        with open_binary(path) as f:
            progress = Progress(f"reading {path}", total // 1_000_000 or None, "MB")
            done = 0
            lineno = 0
            while True:
                # +2: room for "\r\n" after a line of exactly max_bytes bytes.
                raw = f.readline() if max_bytes is None else f.readline(max_bytes + 2)
                if not raw:
                    return
                lineno += 1
                done += len(raw)
                if max_bytes is not None and len(raw.rstrip(b"\r\n")) > max_bytes:
                    while not raw.endswith(b"\n"):  # the rest of the line, a block at a time
                        raw = f.readline(1 << 20)
                        done += len(raw)
                        if not raw:
                            break
                    yield lineno, None
                else:
                    yield lineno, raw
                if lineno % _PROGRESS_LINES == 0:
                    progress.update(done // 1_000_000)
    except OSError as exc:
        raise file_error(path, exc) from None
    except EOFError:  # a .gz cut short
        raise DataError(f"{path}: truncated compressed file") from None


def whole_text(path: Path) -> str:
    """The whole file as text (UTF-8, an optional BOM dropped; `.gz` decompressed); bad bytes
    name their line."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # EOFError: a truncated .gz
        if isinstance(exc, EOFError):
            raise DataError(f"{path}: truncated compressed file") from None
        raise file_error(path, exc) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {column})") from None


def decoded_lines(
    path: Path,
    bad: Callable[[str], None],
    max_bytes: int | None = None,
    oversized: list[int] | None = None,
) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of each non-blank line; a line that is not
    UTF-8 goes to `bad` as a one-line problem. Lines over `max_bytes` bytes go, unread, to
    `oversized` by number."""
    for lineno, raw in raw_lines(path, max_bytes):
        if raw is None:
            if oversized is not None:
                oversized.append(lineno)
            continue
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as some editors write
        if not raw.strip():
            continue
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            bad(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start + 1})")


_WS = re.compile(r"[ \t\n\r]*")


def skip_ws(text: str, pos: int) -> int:
    """Offset of the first non-whitespace character (JSON's whitespace) at or after `pos`."""
    match = _WS.match(text, pos)
    return match.end() if match else pos


def array_starts(text: str, pos: int) -> list[int]:
    """Offsets of the elements of the (valid) JSON array that starts at `pos`."""
    decoder = json.JSONDecoder()
    starts: list[int] = []
    pos = skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return starts
    while True:
        starts.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = skip_ws(text, pos)
        if not text.startswith(",", pos):
            return starts
        pos = skip_ws(text, pos + 1)


def data_array_start(text: str, pos: int) -> int:
    """Offset of the value of the last "data" key of the (valid) JSON object at `pos`."""
    decoder = json.JSONDecoder()
    found = -1
    pos = skip_ws(text, pos + 1)
    while not text.startswith("}", pos):
        key, pos = decoder.raw_decode(text, pos)
        pos = skip_ws(text, skip_ws(text, pos) + 1)  # past the colon
        if key == "data":
            found = pos  # json.loads keeps the last of repeated keys; so do we
        _, pos = decoder.raw_decode(text, pos)
        pos = skip_ws(text, pos)
        if text.startswith(",", pos):
            pos = skip_ws(text, pos + 1)
    return found
