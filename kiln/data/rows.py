"""Rows and read options: what every reader returns, and what it needs besides a path.

Every later stage (field checks, filters, templates) names a row's location in its errors
through `Row.where`: `file:line` for line-based files (JSONL, JSON, CSV, text), `name#index`
(0-based) for columnar sources (Parquet, `datasets` datasets, Python objects: see
`kiln.data.python`).

Malformed rows go to a `BadRows` collector: raised together as one `DataError`
(`data.on_bad_row=error`) or counted and skipped (`skip`). `ReadOptions` carries the collector
with the rest of a data config's source settings (`data.format`, `data.hf_split`,
`data.text_field`, `data.max_chars`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.errors import DataError

if TYPE_CHECKING:
    from kiln.config import DataConfig

__all__ = ["BadRows", "IndexRow", "ReadOptions", "Row", "json_type", "where"]

# Stop collecting problems after this many: a broken file should not print a million lines.
_MAX_PROBLEMS = 10
# Bad rows named in DataStats and in the warning when data.on_bad_row=skip.
_MAX_EXAMPLES = 5


class Row(dict[str, Any]):
    """A data row (a plain dict of its fields) that also knows where it was read from.

    Attributes:
        source: the file (or dataset) the row came from.
        line: its 1-based line number in that file (for an `IndexRow`, its 0-based index).
    """

    __slots__ = ("line", "source")
    _sep: ClassVar[str] = ":"

    def __init__(self, fields: Mapping[str, Any], source: str, line: int) -> None:
        super().__init__(fields)
        self.source = source
        self.line = line

    @property
    def where(self) -> str:
        """`file:line` of the row (`name#index` for an `IndexRow`), for error messages."""
        return f"{self.source}{self._sep}{self.line}"

    def __reduce__(self) -> tuple[Any, ...]:
        # dict subclasses pickle their items but not slots by default; keep the location.
        return (type(self), (dict(self), self.source, self.line))


class IndexRow(Row):
    """A row of a columnar source (Parquet, a dataset, a Python list): `where` is `name#index`."""

    __slots__ = ()
    _sep: ClassVar[str] = "#"


def where(row: Mapping[str, Any], index: int) -> str:
    """`file:line` of a `Row`, or `row <index>` for a plain mapping supplied by the user."""
    return row.where if isinstance(row, Row) else f"row {index}"


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


class BadRows:
    """Where malformed rows are reported: collected and raised, or counted and skipped.

    Args:
        skip: False (`data.on_bad_row=error`): `check()` raises every problem added since the
            last check as one DataError. True (`skip`): problems are only counted, and the
            first few kept in `examples`.

    Attributes:
        count: bad rows seen (skip mode).
        examples: the first 5 problems, each a line naming the row's location.
    """

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []
        self._problems = _Problems()

    def add(self, problem: str) -> None:
        """Report one bad row; `problem` names its location, e.g. `f.jsonl:3: invalid JSON`."""
        if not self.skip:
            self._problems.add(problem)
            return
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(problem)

    def check(self) -> None:
        """Raise the problems collected so far (error mode); a no-op when skipping."""
        problems, self._problems = self._problems, _Problems()
        problems.raise_if_any()


@dataclass
class ReadOptions:
    """What readers need besides a path: the data config's source settings."""

    format: str = "auto"
    """`data.format`: auto (by suffix), jsonl, json, csv, parquet, text or hf."""
    hf_split: str = "train"
    """Split of a `datasets` DatasetDict or hub dataset."""
    text_field: str = "text"
    """Field that holds each line of a text file."""
    bad: BadRows = field(default_factory=BadRows)
    """Collector of malformed rows (raises by default)."""
    max_chars: int | None = None
    """`data.max_chars`: JSONL lines over `max_line_bytes(max_chars)` bytes are dropped
    unparsed; text-file lines are cut into rows of at most this many characters. None: no
    limit."""
    too_long: int = 0
    """Lines the readers dropped unparsed for their size so far (`load_splits` counts them in
    `DataStats.dropped["too_long"]`)."""

    @classmethod
    def from_config(cls, data: DataConfig) -> ReadOptions:
        """The options of a data config: its format, split, text field, size limit, and a
        fresh bad-row collector for `data.on_bad_row`."""
        return cls(
            format=data.format,
            hf_split=data.hf_split,
            text_field=data.text_field,
            bad=BadRows(skip=data.on_bad_row == "skip"),
            max_chars=data.max_chars,
        )
