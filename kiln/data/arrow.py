"""Arrow-backed sources: Parquet files and Hugging Face `datasets` datasets.

Both need the `data` extra (`pip install 'kiln[data]'`: pyarrow, datasets), imported only when
such a source is read (without it, a one-line `MissingExtra` names the extra). Their rows are
`IndexRow`s named `name#index` (0-based): `file.parquet#3`, `path/to/saved[train]#3`,
`hf:user/recipes[train]#3`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.data.rows import IndexRow, ReadOptions, Row
from kiln.errors import DataError, first_line
from kiln.registry import require_extra

__all__ = ["read_dataset", "read_parquet"]

_HF_PREFIX = "hf:"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _rows(records: list[dict[str, Any]], name: str) -> list[Row]:
    return [IndexRow(record, name, i) for i, record in enumerate(records)]


def read_parquet(path: str | Path, options: ReadOptions | None = None) -> list[Row]:
    """Read a Parquet file (with pyarrow); rows are named `path#index`.

    Raises:
        DataError: a missing or unreadable file.
        MissingExtra: pyarrow is not installed (the `data` extra).
    """
    path = Path(path)
    pq = require_extra("pyarrow.parquet", "data", feature=f"reading {path}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read Parquet ({_one_line(exc)})") from None
    return _rows(table.to_pylist(), str(path))


def read_dataset(source: str, options: ReadOptions | None = None) -> list[Row]:
    """Read a `datasets` dataset: a `save_to_disk` directory, or `hf:<name>` from the hub.

    A saved DatasetDict, and a hub dataset, give their `options.hf_split` split; a saved
    Dataset is read whole. Hub datasets go through `datasets.load_dataset(name, split=...)`
    (and its cache). With `data.format: hf`, a source that is not a directory is a hub name
    even without the `hf:` prefix.

    Raises:
        DataError: a dataset that cannot be loaded, or a missing split (naming the ones there
            are).
        MissingExtra: `datasets` is not installed (the `data` extra).
    """
    options = options or ReadOptions()
    split = options.hf_split
    datasets = require_extra("datasets", "data", feature=f"reading {source}")
    path = Path(source)
    if not source.startswith(_HF_PREFIX) and path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises many kinds; the user needs one line
            raise DataError(f"{source}: cannot load the saved dataset ({_one_line(exc)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                have = ", ".join(loaded) or "none"
                raise DataError(
                    f"{source}: no split '{split}' (data.hf_split); the dataset has: {have}"
                )
            loaded = loaded[split]
        else:
            split = str(loaded.split) if loaded.split is not None else ""
    else:
        name = source.removeprefix(_HF_PREFIX)
        try:
            loaded = datasets.load_dataset(name, split=split)
        except Exception as exc:  # network, unknown name or split, ...: one line
            raise DataError(f"{source}: cannot load the dataset ({_one_line(exc)})") from None
    label = f"{source}[{split}]" if split else source
    return _rows(loaded.to_list(), label)
