"""Data sources: read the rows a source spec stands for, each row knowing its origin.

A source spec (`data.train`, `data.val`) is one string or a list of them, each:

- a file, read by `data.format` or, when that is `auto`, by its suffix (`SUFFIX_FORMATS`;
  any other suffix is read as JSONL): the readers are in `kiln.data.readers`;
- a glob (`data/*.jsonl`, `**` allowed): its matches, sorted; matching nothing is an error;
- a directory holding a `datasets` dataset written by `save_to_disk` (a DatasetDict gives
  its `data.hf_split` split);
- `hf:<name>`: a Hugging Face hub dataset, `datasets.load_dataset(name, split=hf_split)`.

`read_rows` reads a spec whole, `iter_rows` one row at a time (JSONL, CSV and text files
streamed). The rows, options and bad-row collector (`Row`, `ReadOptions`, `BadRows`) are in
`kiln.data.rows`; this module re-exports them, the readers and `expand_source`, so that
`kiln.data.sources` stays the one import for reading data. `expand_source` itself lives in
`kiln.files` (no torch), so `kiln.preflight` checks the specs by the same rule before anything
heavy loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from kiln.data.progress import Progress
from kiln.data.readers import (
    READERS,
    STREAMERS,
    SUFFIX_FORMATS,
    file_format,
    iter_csv,
    iter_jsonl,
    iter_text,
    read_csv,
    read_json,
    read_jsonl,
    read_text,
)
from kiln.data.rows import BadRows, IndexRow, ReadOptions, Row, json_type, where
from kiln.data.rows import _Problems as _Problems  # re-exported for the data pipeline's stages
from kiln.errors import DataError
from kiln.files import HF_PREFIX, expand_source, is_saved_dataset

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
    if source.startswith(HF_PREFIX) or options.format == "hf":
        from kiln.data.arrow import read_dataset

        return read_dataset(source, options)
    path = Path(source)
    if path.is_dir():
        if is_saved_dataset(path):
            from kiln.data.arrow import read_dataset

            return read_dataset(source, options)
        raise DataError(
            f"{path}: is a directory, expected a data file or a dataset saved with save_to_disk"
        )
    return READERS.get(file_format(path, options.format))(path, options)


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
            if not source.startswith(HF_PREFIX) and options.format != "hf" and not path.is_dir():
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
