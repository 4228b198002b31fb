"""Data sources: read rows from files, each row remembering the file and line it came from.

Every later stage (field checks, filters, templates) names `file:line` in its errors through
`Row.where`. New formats plug in by adding a reader to `READERS`, keyed by file suffix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kiln.errors import DataError

__all__ = ["READERS", "Row", "json_type", "read_jsonl", "read_rows", "where"]

# Stop collecting problems after this many: a broken file should not print a million lines.
_MAX_PROBLEMS = 10


class Row(dict[str, Any]):
    """A data row (a plain dict of its fields) that also knows where it was read from.

    Attributes:
        source: the file the row came from.
        line: its 1-based line number in that file.
    """

    __slots__ = ("line", "source")

    def __init__(self, fields: Mapping[str, Any], source: str, line: int) -> None:
        super().__init__(fields)
        self.source = source
        self.line = line

    @property
    def where(self) -> str:
        """`file:line` of the row, for error messages."""
        return f"{self.source}:{self.line}"

    def __reduce__(self) -> tuple[Any, ...]:
        # dict subclasses pickle their items but not slots by default; keep the location.
        return (Row, (dict(self), self.source, self.line))


def where(row: Mapping[str, Any], index: int) -> str:
    """`file:line` of a `Row`, or `row <index>` for a plain mapping supplied by the user."""
    return row.where if isinstance(row, Row) else f"row {index}"


class _Problems:
    """Collects one-line problems, capped at `_MAX_PROBLEMS`, then raises them as one DataError."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.extra = 0

    def add(self, line: str) -> None:
        if len(self.lines) < _MAX_PROBLEMS:
            self.lines.append(line)
        else:
            self.extra += 1

    def raise_if_any(self) -> None:
        if self.lines:
            more = [f"... and {self.extra} more problems"] if self.extra else []
            raise DataError(self.lines + more)


def _open_lines(path: Path) -> list[bytes]:
    try:
        with path.open("rb") as f:
            return f.readlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def read_jsonl(path: str | Path) -> list[Row]:
    """Read a JSONL file: each non-blank line one JSON object.

    Args:
        path: the file.

    Returns:
        The rows in file order, each a `Row` (a dict) carrying its file and line number.

    Raises:
        DataError: a missing file, or lines that are not JSON objects (each named `path:LINE`).
    """
    path = Path(path)
    name = str(path)
    rows: list[Row] = []
    problems = _Problems()
    for lineno, raw in enumerate(_open_lines(path), 1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as some editors write
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(f"{name}:{lineno}: not valid UTF-8 (byte {exc.start + 1})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(f"{name}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            problems.add(f"{name}:{lineno}: expected a JSON object, got {json_type(value)}")
            continue
        rows.append(Row(value, name, lineno))
    problems.raise_if_any()
    return rows


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type (for messages: `null`, `array`, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


READERS: dict[str, Callable[[str | Path], list[Row]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
}
"""Reader per file suffix; files with any other suffix are read as JSONL."""


def read_rows(path: str | Path) -> list[Row]:
    """Read a data file with the reader for its suffix (JSONL by default)."""
    reader = READERS.get(Path(path).suffix.lower(), read_jsonl)
    return reader(path)
