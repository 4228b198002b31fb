"""Per-document curriculum values of a shard set (`data.curriculum` with `data.storage: shards`).

A curriculum reads values of the training rows: a difficulty (a numeric row field, or `length`
/ `num_steps` of the rendered text) and, with a quality ramp, `data.quality_field`. A shard set
holds tokens, not rows; but document i of a set is always kept row i (see `prepare.py`), so one
pass over the sources through the same checks, filters and dedup, without tokenizing, gives
each document's row, and `row_values` gives its values exactly as the in-memory path computes
them. The pass runs once per value (the first run that needs it; under torchrun the main rank)
and its result is kept beside the set as `values-<name>-<digest>.npy`, (documents,) float64
(8 bytes a document), the digest from what the value is (its kind and field), written
atomically; a later run reads it back in O(1) per document. The set's key does not change:
the values are extra files of a complete set, like `stats.json`, and the set's directory lock
serializes the passes of two processes.

A row missing a field the curriculum needs is one line naming its `file:line`, as in memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import DataError, KilnError

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.rank import RankContext

__all__ = ["document_values", "order_documents", "per_example", "reads_rows", "value_names"]

log = logging.getLogger("kiln")


def reads_rows(cfg: RunConfig) -> bool:
    """Whether the config's curriculum needs values of the rows (a field, the rendered
    text), not only the examples' token counts (`difficulty: length` without packing or a
    quality ramp)."""
    cur = cfg.data.curriculum
    if cur is None:
        return False
    packed = cfg.task == "causal_lm" and cfg.data.packing  # ordered by the rows' lengths
    return cur.quality is not None or (bool(cur.stages) and (cur.difficulty != "length" or packed))


def value_names(cfg: RunConfig) -> dict[str, str]:
    """What the curriculum reads, by value (`difficulty`, `quality`): its kind and field."""
    cur = cfg.data.curriculum
    assert cur is not None
    names = {}
    if cur.stages:
        names["difficulty"] = f"difficulty:{cur.difficulty}"
    if cur.quality is not None:
        names["quality"] = f"quality:{cfg.data.quality_field}"
    return names


def _path(directory: Path, value: str, name: str) -> Path:
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return directory / f"values-{value}-{digest}.npy"


def document_values(
    cfg: RunConfig, directory: Path, documents: int, rank: RankContext | None = None
) -> dict[str, np.ndarray]:
    """The curriculum's values of each document of the set at `directory` ((documents,)
    float64 arrays by value name), computed from the sources once and kept in the set.

    Raises:
        DataError: one line: rows without a field the curriculum reads (named file:line).
    """
    if rank is None or not rank.distributed:
        return _values(cfg, directory, documents)
    error: str | None = None
    if rank.is_main:
        try:
            _values(cfg, directory, documents)
        except KilnError as exc:
            error = str(exc)
    error = rank.broadcast(error, "computing the curriculum's values of the shard set")
    if error is not None:
        raise DataError(error)
    return _values(cfg, directory, documents)  # found: read back


def _values(cfg: RunConfig, directory: Path, documents: int) -> dict[str, np.ndarray]:
    from kiln.files import RunLock

    names = value_names(cfg)
    found = {value: _read(_path(directory, value, name)) for value, name in names.items()}
    if all(v is not None and v.size == documents for v in found.values()):
        return found  # type: ignore[return-value]
    lock = RunLock(directory, what="shard set").acquire(wait=True)
    try:  # another process may have written them while this one waited
        found = {value: _read(_path(directory, value, name)) for value, name in names.items()}
        if all(v is not None and v.size == documents for v in found.values()):
            return found  # type: ignore[return-value]
        return _compute(cfg, directory, documents, names)
    finally:
        lock.release()


def _read(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def _compute(
    cfg: RunConfig, directory: Path, documents: int, names: dict[str, str]
) -> dict[str, np.ndarray]:
    """One pass over the sources (rows kept as prepare keeps them), the values saved."""
    from kiln.data.curriculum import row_values
    from kiln.data.shards.prepare import BATCH_ROWS, DEDUP_RUNS, Documents, check_supported
    from kiln.files import write_atomic, writing

    log.info(
        "curriculum: reading the values (%s) of the %d documents of %s once",
        ", ".join(names.values()),
        documents,
        directory,
    )
    parts: dict[str, list[np.ndarray]] = {value: [] for value in names}
    docs = Documents(cfg, check_supported(cfg), BATCH_ROWS, directory / DEDUP_RUNS)
    for kept in docs.kept():
        if not kept:
            continue
        got = row_values(cfg, [row for row, _ in kept], [rendered for _, rendered in kept])
        for value in names:
            parts[value].append(got[value].numpy())
    out = {value: np.concatenate(chunks or [np.zeros(0)]) for value, chunks in parts.items()}
    for value, array in out.items():
        if array.size != documents:  # the sources changed since the set was prepared
            raise DataError(
                f"data.train: the sources now give {array.size} documents, the shard set "
                f"{directory} holds {documents}; they changed since it was prepared"
            )
        path = _path(directory, value, names[value])
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float64), allow_pickle=False)
        with writing(f"the curriculum values {path}"):
            write_atomic(path, buffer.getvalue())
    return out


def order_documents(values: dict[str, np.ndarray], docs: np.ndarray) -> np.ndarray:
    """`docs` sorted by (difficulty, -quality), stably: the order `order_rows` gives the rows
    of a packed curriculum run in memory."""
    zeros = np.zeros(docs.size)
    difficulty = values["difficulty"][docs] if "difficulty" in values else zeros
    quality = values["quality"][docs] if "quality" in values else zeros
    return docs[np.lexsort((-quality, difficulty))]


def per_example(values: dict[str, np.ndarray], docs: np.ndarray) -> dict[str, Any]:
    """The values of documents `docs` (an example's, or a packed stream's, in order), as
    float64 tensors."""
    import torch

    return {
        value: torch.from_numpy(array[docs].astype(np.float64)) for value, array in values.items()
    }
