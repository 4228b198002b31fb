"""File readers: one per data format, each turning a file into `Row`s named `file:line`.

Formats: JSONL (one object per non-blank line); JSON (a list of objects, or an object whose
"data" key holds one); CSV (a header row, then one row per record; values stay strings; blank
records are skipped); text (each line with non-blank content is a row `{text_field: line}`,
the line without its newline); Parquet (pyarrow, `kiln.data.arrow`). New formats plug in
through `READERS`; under `data.format: auto` a file is read by its suffix (`SUFFIX_FORMATS`,
`file_format`; any other suffix is read as JSONL). JSONL, CSV and text files (`.gz` too) can
also be read one row at a time (`STREAMERS`).

Malformed rows (bad JSON, not an object, a wrong field count, arrays/objects nested more than
100 levels, an integer too long for Python to convert) go to the options' `BadRows` collector.
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
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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
from kiln.data.rows import ReadOptions, Row, json_type
from kiln.errors import DataError
from kiln.registry import Registry

__all__ = [
    "READERS",
    "STREAMERS",
    "SUFFIX_FORMATS",
    "file_format",
    "iter_csv",
    "iter_jsonl",
    "iter_text",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_text",
]

log = logging.getLogger("kiln")


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
"""Formats read one row at a time by `kiln.data.sources.iter_rows`; the others are read a
whole file at a time."""
