"""Reading data files by line: line numbers for messages, bounded line sizes, progress.

A file is read one line at a time, so memory holds the rows made so far, not the file's lines
too, and a line over a size limit is skipped in bounded blocks, never held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from kiln.data.progress import Progress
from kiln.errors import DataError

__all__ = ["decoded_lines", "file_error", "raw_lines", "whole_text"]

# Lines between two progress checks (a clock read) while reading a file.
_PROGRESS_LINES = 4096


def file_error(path: Path, exc: OSError) -> DataError:
    """A one-line DataError for a file that cannot be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{path}: is a directory, expected a file")
    return DataError(f"{path}: cannot read ({exc.strerror})")


def raw_lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes with the line break) of each line, read one line at a time.

    A line of more than `max_bytes` bytes (without its break) is read past in bounded blocks
    and given as None, so a huge line is never held in memory. A slow read logs progress.
    """
    try:
        total = path.stat().st_size
        with path.open("rb") as f:
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


def whole_text(path: Path) -> str:
    """The whole file as text (UTF-8, an optional BOM dropped); bad bytes name their line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
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
