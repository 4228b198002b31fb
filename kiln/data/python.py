"""Python data: the objects `Trainer(train_data=..., val_data=...)` accepts, sorted into text
rows (which then go through the same pipeline as files) or token examples.

Containers: a list or tuple, a map-style torch `Dataset` (`len` + `[i]`), a `datasets.Dataset`,
an iterable (a torch `IterableDataset`, a `datasets.IterableDataset`, a generator), read once
and kept in memory up to `MAX_ITERABLE_ITEMS` items, or an (N, L) integer tensor of token ids.
A `datasets.DatasetDict` stands for its splits (`dataset_dict_splits`).

Items, all of one kind (the first item decides):

- text rows: dicts of fields (`{"text": ...}`, `{"prompt": ..., "response": ...}`), or strings,
  each a row `{data.text_field: string}`. They become `IndexRow`s named `name#index`
  (`train_data#3`), read by `load_splits` where a file's rows would be (`PythonRows`).
- token examples: dicts with `input_ids` (and optional `labels`), or sequences of token ids
  (lists, tuples, 1-D tensors or arrays).

Every problem is one line naming the item, e.g. `train_data#3: missing field 'text'` or
`train_data#2: 'input_ids' must hold token ids (integers >= 0), got floats`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.data.collate import IGNORE_INDEX
from kiln.data.dataset import TokenDataset
from kiln.data.rows import BadRows, IndexRow, ReadOptions, Row
from kiln.errors import DataError

__all__ = [
    "MAX_ITERABLE_ITEMS",
    "PythonRows",
    "TokenExamples",
    "dataset_dict_splits",
    "iter_ids",
    "python_data",
    "rows_from_python",
]

MAX_ITERABLE_ITEMS = 1_000_000
"""Most items read from an iterable without a length (an `IterableDataset`, a generator): it
is read once, into memory, at setup; a longer stream is refused (write it to a file)."""

_VAL_SPLITS = ("validation", "test")


def _is_hf(obj: Any, kind: str) -> bool:
    module = sys.modules.get("datasets")  # loaded whenever such an object exists
    return module is not None and isinstance(obj, getattr(module, kind, ()))


def dataset_dict_splits(obj: Any, name: str) -> tuple[Any, Any]:
    """(training split, validation split or None) of a `datasets.DatasetDict`.

    As `train_data`: its "train" split, and its "validation" split (else "test") for
    validation. As `val_data` (`name` "val_data"): its "validation" split, else "test".
    """
    splits = ", ".join(obj) or "none"
    val = next((obj[key] for key in _VAL_SPLITS if key in obj), None)
    if name == "val_data":
        if val is None:
            raise DataError(f"{name}: a DatasetDict without a validation or test split ({splits})")
        return val, None
    if "train" not in obj:
        raise DataError(f"{name}: a DatasetDict without a train split ({splits})")
    return obj["train"], val


def _items(obj: Any, name: str) -> Sequence[Any]:
    """The items of a container, in memory (an iterable is read once, up to the limit)."""
    if _is_hf(obj, "DatasetDict"):
        splits = ", ".join(obj)
        raise DataError(f"{name}: a DatasetDict; pass one split, e.g. data['train'] ({splits})")
    if isinstance(obj, (list, tuple)):
        return obj
    if _is_hf(obj, "Dataset"):
        return obj.to_list()
    if isinstance(obj, (str, bytes, Mapping)) or not (
        hasattr(obj, "__iter__") or hasattr(obj, "__getitem__")
    ):
        raise DataError(
            f"{name}: expected a list of dicts, strings or token ids, a torch Dataset, a "
            f"datasets.Dataset or an (N, L) tensor of token ids, got {type(obj).__name__}"
        )
    from torch.utils.data import IterableDataset

    if not isinstance(obj, IterableDataset) and hasattr(obj, "__len__"):
        try:
            n = len(obj)
        except TypeError:  # a Dataset subclass that does not define __len__
            n = None
        if n is not None and hasattr(obj, "__getitem__"):
            return [obj[i] for i in range(n)]  # a map-style torch Dataset
    items = []
    for item in obj:  # an IterableDataset, a generator
        if len(items) == MAX_ITERABLE_ITEMS:
            raise DataError(
                f"{name}: an iterable of more than {MAX_ITERABLE_ITEMS:,} items; write it to a "
                "file (data.train) or pass a map-style Dataset"
            )
        items.append(item)
    return items


def rows_from_python(
    obj: Any, *, name: str = "<python>", bad: BadRows | None = None, text_field: str | None = None
) -> list[IndexRow]:
    """Rows from a Python object: a list of dicts, a torch Dataset yielding dicts, or a
    `datasets.Dataset`.

    Args:
        obj: the data.
        name: the source name in locations (`<python>#3`).
        bad: where items that are not dicts go (default: raise them).
        text_field: when set, a string item is the row `{text_field: item}`.

    Returns:
        One `IndexRow` per item (a shallow copy of its fields), located `name#index`.

    Raises:
        DataError: an unsupported object, or (unless skipped) items that are not dicts.
    """
    return PythonRows(name, _items(obj, name), text_field).read(ReadOptions(bad=bad or BadRows()))


@dataclass(frozen=True)
class PythonRows:
    """Text rows given as Python items, standing where a file spec would in `load_splits`."""

    name: str
    """`train_data` or `val_data`: rows are named `name#index`."""
    items: Sequence[Any]
    text_field: str | None = None
    """A string item is the row `{text_field: item}` (None: strings are bad rows)."""

    def __str__(self) -> str:
        return self.name

    def read(self, options: ReadOptions) -> list[Row]:
        """The rows, each an `IndexRow`; other items go to `options.bad` (raised by default)."""
        rows: list[Row] = []
        for i, item in enumerate(self.items):
            if isinstance(item, Mapping):
                rows.append(IndexRow(item, self.name, i))
            elif isinstance(item, str) and self.text_field is not None:
                rows.append(IndexRow({self.text_field: item}, self.name, i))
            else:
                want = "a dict" if self.text_field is None else "a dict or a string (a text row)"
                options.bad.add(f"{self.name}#{i}: expected {want}, got {type(item).__name__}")
        options.bad.check()
        return rows


@dataclass(frozen=True)
class TokenExamples:
    """Token examples given as Python items: (N,) id sequences, with or without labels."""

    name: str
    ids: list[list[int]] | torch.Tensor
    """Per-example token ids, or an (N, L) tensor of blocks."""
    labels: list[list[int]] | None = None
    max_id: int = -1
    """The largest token id (input_ids and labels)."""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> TokenExamples:
        """The examples at `indices`, in that order."""
        if isinstance(self.ids, torch.Tensor):
            ids: Any = self.ids[torch.as_tensor(list(indices), dtype=torch.int64)]
        else:
            ids = [self.ids[i] for i in indices]
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return TokenExamples(self.name, ids, labels, self.max_id)

    def dataset(self, task: str) -> TokenDataset:
        """The examples as a TokenDataset: causal labels line up with input_ids (the loss
        shifts them), seq2seq labels are a separate target."""
        if isinstance(self.ids, torch.Tensor):
            return TokenDataset(self.ids)
        aligned = self.labels is not None and task != "seq2seq"
        return TokenDataset(self.ids, self.labels, aligned=aligned)


def _token_ids(value: Any, where: str, key: str, *, labels: bool = False) -> list[int]:
    """A 1-D sequence of token ids as a list; a one-line DataError naming `where` otherwise."""
    what = f"{where}: '{key}'" if key else where
    if isinstance(value, (str, bytes, Mapping)):
        raise DataError(f"{what} must be a sequence of token ids, got {type(value).__name__}")
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"{what} must be a sequence of token ids, got {type(value).__name__}"
        ) from None
    if t.dim() != 1:
        raise DataError(f"{what} must be 1-D token ids, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise DataError(f"{what} is empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        got = "booleans" if t.dtype == torch.bool else "floats"
        raise DataError(f"{what} must hold token ids (integers >= 0), got {got}")
    bad = (t < 0) & (t != IGNORE_INDEX) if labels else t < 0
    if bool(bad.any()):
        allowed = f"integers >= 0 or {IGNORE_INDEX}" if labels else "integers >= 0"
        raise DataError(f"{what} must hold token ids ({allowed}), got {int(t[bad][0])}")
    return t.tolist()


def _tokens(items: Sequence[Any], name: str) -> TokenExamples:
    """Token examples from dicts with `input_ids` (optional `labels`) or id sequences."""
    with_labels = isinstance(items[0], Mapping) and "labels" in items[0]
    ids, labels, top = [], [] if with_labels else None, -1
    for i, item in enumerate(items):
        where = f"{name}#{i}"
        if isinstance(items[0], Mapping):
            if not isinstance(item, Mapping):
                raise DataError(
                    f"{where}: expected a dict with 'input_ids' (as item 0), "
                    f"got {type(item).__name__}"
                )
            if "input_ids" not in item:
                raise DataError(f"{where}: missing field 'input_ids'")
            ids.append(_token_ids(item["input_ids"], where, "input_ids"))
            if labels is not None:
                if "labels" not in item:
                    raise DataError(f"{where}: missing field 'labels' (item 0 has labels)")
                labels.append(_token_ids(item["labels"], where, "labels", labels=True))
                top = max(top, *labels[-1])
        else:
            ids.append(_token_ids(item, where, ""))
        top = max(top, *ids[-1])
    return TokenExamples(name, ids, labels, top)


def _is_token_item(item: Any) -> bool:
    if isinstance(item, Mapping):
        return "input_ids" in item
    return isinstance(item, (list, tuple, torch.Tensor)) or hasattr(item, "__array__")


def python_data(obj: Any, name: str, *, text_field: str) -> PythonRows | TokenExamples:
    """Sort Python data into text rows or token examples (see the module docstring).

    Args:
        obj: the data (`train_data` or `val_data`); not a DatasetDict (`dataset_dict_splits`).
        name: `train_data` or `val_data`, naming items in messages (`train_data#3`).
        text_field: the row field a string item becomes (`data.text_field`).

    Raises:
        DataError: an unsupported or empty object, or items that are not token examples (when
            the first one is), each a one-line message naming the item.
    """
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 2 or obj.is_floating_point() or obj.dtype == torch.bool:
            raise DataError(
                f"{name}: a tensor must be (N, L) integer token ids, got shape "
                f"{tuple(obj.shape)} and dtype {obj.dtype}"
            )
        if obj.numel() and int(obj.min()) < 0:
            raise DataError(f"{name}: token ids must be >= 0, got {int(obj.min())}")
        top = int(obj.max()) if obj.numel() else -1
        return TokenExamples(name, obj.to(torch.int64), None, top)
    items = _items(obj, name)
    if len(items) == 0:
        raise DataError(f"{name}: no items (the data is empty)")
    if _is_token_item(items[0]):
        return _tokens(items, name)
    if not isinstance(items[0], (Mapping, str)):
        raise DataError(
            f"{name}#0: expected a dict, a string or a sequence of token ids, "
            f"got {type(items[0]).__name__}"
        )
    return PythonRows(name, items, text_field)


def iter_ids(data: TokenDataset) -> Iterable[torch.Tensor]:
    """Every example's input_ids (and labels) tensors, for range checks."""
    for i in range(len(data)):
        yield from data[i].values()
