"""Data sources: read rows from files, datasets and Python objects, each row knowing its origin.

Every later stage (field checks, filters, templates) names a row's location in its errors
through `Row.where`: `file:line` for line-based files (JSONL, JSON, CSV, text), `name#index`
(0-based) for columnar sources (Parquet, `datasets` datasets, Python objects: see
`kiln.data.python`).

A source spec (`data.train`, `data.val`) is one string or a list of them, each:

- a file, read by `data.format` or, when that is `auto`, by its suffix (`SUFFIX_FORMATS`;
  any other suffix is read as JSONL);
- a glob (`data/*.jsonl`, `**` allowed): its matches, sorted; matching nothing is an error;
- a directory holding a `datasets` dataset written by `save_to_disk` (a DatasetDict gives
  its `data.hf_split` split);
- `hf:<name>`: a Hugging Face hub dataset, `datasets.load_dataset(name, split=hf_split)`.

Formats: JSONL (one object per non-blank line); JSON (a list of objects, or an object whose
"data" key holds one); CSV (a header row, then one row per record; values stay strings; blank
records are skipped); text (each line with non-blank content is a row `{text_field: line}`,
the line without its newline); Parquet (pyarrow). New formats plug in through `READERS`.

Malformed rows (bad JSON, not an object, a wrong field count, arrays/objects nested more than
100 levels, an integer too long for Python to convert) go to a `BadRows` collector:
raised together as one `DataError` (`data.on_bad_row=error`) or counted and skipped (`skip`).
Problems with a whole file (missing, not UTF-8 where the format cannot resynchronize, not
valid JSON) are always errors.

The work per row is bounded (`kiln.data.limits`) by `ReadOptions.max_chars` (`data.max_chars`):
a JSONL line of more than `max_line_bytes(max_chars)` bytes is dropped without being parsed
(counted in `ReadOptions.too_long`), and a text-file line longer than `max_chars` characters is
cut into rows of at most that many (`split_text`), so one huge line neither stalls the run nor
is lost.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.data.limits import (
    MAX_DEPTH,
    TOO_DEEP,
    json_hazard,
    json_problem,
    max_line_bytes,
    openers,
    parse_json_line,
    split_text,
    too_deep,
)
from kiln.data.lines import (
    COMPRESSED,
    array_starts,
    data_array_start,
    decoded_lines,
    file_error,
    open_binary,
    skip_ws,
    whole_text,
)
from kiln.data.progress import Progress
from kiln.errors import DataError
from kiln.registry import Registry

if TYPE_CHECKING:
    from kiln.config import DataConfig

__all__ = [
    "READERS",
    "SUFFIX_FORMATS",
    "BadRows",
    "IndexRow",
    "ReadOptions",
    "Row",
    "expand_source",
    "file_format",
    "iter_csv",
    "iter_jsonl",
    "iter_rows",
    "iter_text",
    "json_type",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_rows",
    "read_source",
    "read_text",
    "where",
]

log = logging.getLogger("kiln")

# Stop collecting problems after this many: a broken file should not print a million lines.
_MAX_PROBLEMS = 10
# Bad rows named in DataStats and in the warning when data.on_bad_row=skip.
_MAX_EXAMPLES = 5
_GLOB_CHARS = re.compile(r"[*?[]")
_HF_PREFIX = "hf:"
# Files `save_to_disk` writes: a Dataset has the first two, a DatasetDict the third.
_SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


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


# --- files ----------------------------------------------------------------------------------


def _drop_oversized(path: Path, lines: list[int], options: ReadOptions, limit: int | None) -> None:
    """Count lines dropped unparsed for their size, and say so once per file."""
    if not lines:
        return
    options.too_long += len(lines)
    log.info(
        "%s: dropped %d line(s) over %s bytes without parsing them (data.max_chars=%s); "
        "first: line %d",
        path,
        len(lines),
        f"{limit:,}",
        options.max_chars,
        lines[0],
    )


def read_jsonl(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read a JSONL file: each non-blank line one JSON object.

    Lines over `max_line_bytes(options.max_chars)` bytes are dropped without being parsed and
    counted in `options.too_long`.

    Args:
        path: the file.
        options: where bad lines go, and the size limit (default: raise them, no limit).

    Returns:
        The rows in file order, each a `Row` (a dict) carrying its file and line number.

    Raises:
        DataError: a missing file, or (unless skipped) lines that are not JSON objects (or nest
            deeper than `MAX_DEPTH`, or hold an integer Python cannot convert), each named
            `path:LINE`.
    """
    return list(iter_jsonl(path, options))


def iter_jsonl(path: str | Path, options: ReadOptions | None = None) -> Iterator[Row]:
    """`read_jsonl`, one row at a time (the file read a line at a time, `.gz` decompressed);
    the problems of an `error`-mode collector are raised when the file is done."""
    path = Path(path)
    options = options or ReadOptions()
    bad = options.bad
    limit = max_line_bytes(options.max_chars)
    oversized: list[int] = []
    for lineno, text in decoded_lines(path, bad.add, limit, oversized):
        value, problem = parse_json_line(text)
        if problem is not None:
            bad.add(f"{path}:{lineno}: {problem}")
            continue
        if not isinstance(value, dict):
            bad.add(f"{path}:{lineno}: expected a JSON object, got {json_type(value)}")
            continue
        yield Row(value, str(path), lineno)
    _drop_oversized(path, oversized, options, limit)
    bad.check()


def read_json(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read a JSON file: a list of objects, or an object whose "data" key holds that list.

    Each row is named by the line its object starts on. The file is parsed whole (it is one
    JSON value), so rows longer than `data.max_chars` are dropped after parsing, by
    `load_splits`.

    Raises:
        DataError: a missing or invalid file (nesting deeper than `MAX_DEPTH` around the list,
            an integer Python cannot convert), another top-level shape, or (unless skipped)
            list items that are not objects or nest deeper than `MAX_DEPTH`, each named
            `path:LINE`.
    """
    path = Path(path)
    bad = (options or ReadOptions()).bad
    text = whole_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({json_problem(exc)})") from None
    except (RecursionError, ValueError) as exc:  # too deep, or an integer too long
        found = json_hazard(text)
        if found is None:  # not expected: json.loads fails on nothing else
            raise DataError(f"{path}: invalid JSON ({type(exc).__name__}: {exc})") from None
        offset, problem = found
        line = text.count("\n", 0, offset) + 1
        raise DataError(f"{path}:{line}: {problem}") from None
    start = skip_ws(text, 0)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        items, start = value["data"], data_array_start(text, start)
    elif isinstance(value, list):
        items = value
    else:
        got = 'an object without a "data" list' if isinstance(value, dict) else json_type(value)
        raise DataError(
            f'{path}: expected a JSON list of objects, or an object with a "data" list; got {got}'
        )
    rows: list[Row] = []
    lineno, last = 1, 0
    starts = array_starts(text, start)
    for i, (item, offset) in enumerate(zip(items, starts, strict=True)):
        lineno += text.count("\n", last, offset)
        last = offset
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        if not isinstance(item, dict):
            bad.add(f"{path}:{lineno}: expected a JSON object, got {json_type(item)}")
        elif openers(text, offset, end) > MAX_DEPTH and too_deep(item):
            bad.add(f"{path}:{lineno}: {TOO_DEEP}")
        else:
            rows.append(Row(item, str(path), lineno))
    bad.check()
    return rows


def read_csv(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read a CSV file with a header row; every value is a string.

    Rows are named by the line their record starts on (a quoted value may span lines).
    Records whose values are all blank are skipped.

    Raises:
        DataError: a missing or non-UTF-8 file, a repeated column name, or (unless skipped)
            records with another number of values than the header, each named `path:LINE`.
    """
    path = Path(path)
    return list(_csv_rows(path, io.StringIO(whole_text(path), newline=""), options))


def iter_csv(path: str | Path, options: ReadOptions | None = None) -> Iterator[Row]:
    """`read_csv`, one record at a time from the file (`.gz` decompressed), never whole."""
    path = Path(path)
    try:
        raw = open_binary(path)
    except OSError as exc:
        raise file_error(path, exc) from None
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        yield from _csv_rows(path, text, options)


def _csv_rows(path: Path, text: Iterable[str], options: ReadOptions | None) -> Iterator[Row]:
    """The records of a CSV text after its header, as rows named by their first line."""
    bad = (options or ReadOptions()).bad
    reader = csv.reader(text)
    header: list[str] | None = None
    line = 0  # the line the last record ended on
    old_limit = csv.field_size_limit(2**31 - 1)  # documents may exceed the 128 KiB default
    try:
        while True:
            start = line + 1
            try:
                record = next(reader, None)
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
            except UnicodeDecodeError:  # streamed: the line is the one being read
                raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8") from None
            line = reader.line_num
            if record is None:
                break
            if not any(value.strip() for value in record):
                continue
            if header is None:
                header = record
                repeated = sorted({name for name in header if header.count(name) > 1})
                if repeated:
                    raise DataError(f"{path}:{start}: repeated column name(s): {repeated}")
            elif len(record) != len(header):
                bad.add(
                    f"{path}:{start}: expected {len(header)} values (the header's), got "
                    f"{len(record)}"
                )
            else:
                yield Row(dict(zip(header, record, strict=True)), str(path), start)
    finally:
        csv.field_size_limit(old_limit)
    bad.check()


def read_text(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read a plain text file: each line with non-blank content is a row `{text_field: line}`.

    The line is kept as written, without its line break. A line longer than
    `options.max_chars` characters (`data.max_chars`) is cut into pieces of at most that many
    (`split_text`), each a row named by the line: a corpus written as one huge line still
    trains, as documents of a bounded size.

    Raises:
        DataError: a missing file, or (unless skipped) lines that are not UTF-8.
    """
    return list(iter_text(path, options))


def iter_text(path: str | Path, options: ReadOptions | None = None) -> Iterator[Row]:
    """`read_text`, one row at a time (the file read a line at a time, `.gz` decompressed)."""
    path = Path(path)
    options = options or ReadOptions()
    for lineno, text in decoded_lines(path, options.bad.add):
        pieces = [text] if options.max_chars is None else split_text(text, options.max_chars)
        for piece in pieces:
            if not piece.isspace():
                yield Row({options.text_field: piece}, str(path), lineno)
    options.bad.check()


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


def _read_parquet(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    from kiln.data.arrow import read_parquet

    return read_parquet(path, options)


Reader = Callable[[Path, ReadOptions | None], list[Row]]

READERS: Registry[Reader] = Registry("data format", reserved=("auto", "hf"))
"""Reader per `data.format` name; a reader takes (path, options) and returns rows. ("auto"
picks one by suffix; "hf" reads `datasets` datasets, which are not files.)"""
READERS.add("jsonl", read_jsonl)
READERS.add("json", read_json)
READERS.add("csv", read_csv)
READERS.add("text", read_text)
READERS.add("parquet", _read_parquet)

SUFFIX_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}
"""Format per file suffix under `data.format: auto`; other suffixes are read as JSONL."""


# --- specs: globs, directories, datasets ------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES)


def expand_source(spec: str | Path) -> list[str]:
    """The sources one spec stands for: a glob's sorted matches, else the spec itself.

    Raises:
        DataError: a glob that matches nothing.
    """
    spec = str(spec)
    if spec.startswith(_HF_PREFIX) or not _GLOB_CHARS.search(spec) or Path(spec).exists():
        return [spec]
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise DataError(f"{spec}: no files match this pattern")
    return matches


def read_source(source: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read one source (not a glob): a file, a saved dataset directory, or `hf:<name>`.

    A read that takes more than a few seconds is logged with its row count (`Progress`).

    Raises:
        DataError: a missing file, an unreadable source, or (unless `options.bad` skips
            them) malformed rows.
        MissingExtra: a format whose optional dependency is not installed (Parquet, datasets).
        UnknownName: a `data.format` no reader is registered for.
    """
    options = options or ReadOptions()
    source = str(source)
    progress = Progress(f"reading {source}")
    rows = _read_one(source, options)
    progress.done(f"read {len(rows):,} rows from {source}")
    return rows


def _read_one(source: str, options: ReadOptions) -> list[Row]:
    if source.startswith(_HF_PREFIX) or options.format == "hf":
        from kiln.data.arrow import read_dataset

        return read_dataset(source, options)
    path = Path(source)
    if path.is_dir():
        if _is_saved_dataset(path):
            from kiln.data.arrow import read_dataset

            return read_dataset(source, options)
        raise DataError(
            f"{path}: is a directory, expected a data file or a dataset saved with save_to_disk"
        )
    return READERS.get(file_format(path, options.format))(path, options)


def file_format(path: Path, fmt: str = "auto") -> str:
    """The format a file is read as: `fmt`, or under `auto` the one of its suffix (the suffix
    before `.gz`/`.zst`: `a.txt.gz` is text; other suffixes: jsonl)."""
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "", "jsonl")


STREAMERS: dict[str, Callable[[Path, ReadOptions | None], Iterator[Row]]] = {
    "jsonl": iter_jsonl,
    "csv": iter_csv,
    "text": iter_text,
}
"""Formats read one row at a time by `iter_rows`; the others are read a whole file at a time."""


def iter_rows(
    spec: str | Path | Sequence[str | Path], options: ReadOptions | None = None
) -> Iterator[Row]:
    """`read_rows`, one row at a time: JSONL, CSV and text files (`.gz` too) are streamed, so
    memory does not grow with a file; JSON, Parquet and datasets are read one source at a time.
    """
    options = options or ReadOptions()
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    for one in specs:
        for source in expand_source(one):
            path = Path(source)
            stream = None
            if not source.startswith(_HF_PREFIX) and options.format != "hf" and not path.is_dir():
                stream = STREAMERS.get(file_format(path, options.format))
            if stream is None:
                yield from read_source(source, options)
            else:
                yield from stream(path, options)


def read_rows(
    spec: str | Path | Sequence[str | Path], options: ReadOptions | None = None
) -> list[Row]:
    """Read a source spec (one string, or a list): every file, glob match or dataset, in order.

    Args:
        spec: e.g. `data/train.jsonl`, `data/*.csv`, `hf:user/recipes`, or a list of these.
        options: format, split, text field and the bad-row collector (default: auto, raise).

    Returns:
        The rows of every source, concatenated in the order given (glob matches sorted).
    """
    options = options or ReadOptions()
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    rows: list[Row] = []
    for one in specs:
        for source in expand_source(one):
            rows.extend(read_source(source, options))
    return rows
