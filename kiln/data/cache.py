"""Tokenization cache: a tokenized `TokenDataset` saved under `data.cache_dir/<key>/`.

The key is a hash of everything that determines the tokens: the rendered texts (what the
tokenizer is given), the tokenizer (its serialized Rust pipeline), the task and the data settings
that shape tokenization and packing, the source of the tokenizing code, and `CACHE_VERSION`.
Change any of them and the key changes: a miss, never a stale hit. An entry is a directory with
`data.pt` (the dataset's tensors, `torch.save`) and `meta.json`, written into a temporary
directory and renamed into place, so a reader sees a complete entry or none; one that cannot be
read back is ignored, removed and rebuilt.

Only fast (Rust-backed) tokenizers are cached: for others there is no cheap, exact fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.data import chat as _chat_module
from kiln.data import dataset as _dataset_module
from kiln.data import tokenize as _tokenize_module
from kiln.data.dataset import TokenDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kiln.config import RunConfig

__all__ = [
    "CACHE_VERSION",
    "WarningCapture",
    "cache_key",
    "cached_dataset",
    "fingerprint_matches",
    "load_entry",
    "settings",
    "tokenizer_fingerprint",
]

log = logging.getLogger("kiln")

CACHE_VERSION = 2
"""Layout of a cache entry; bump it when that changes."""

# data settings that cannot change the tokens of given rendered texts: which rows there are
# (they show in the texts), how batches are formed, and the cache itself.
_NOT_IN_KEY = frozenset(
    {
        "train",
        "val",
        "format",
        "hf_split",
        "on_bad_row",
        "val_split",
        "min_quality_score",
        "quality_field",
        "dedup",
        "min_chars",
        "max_chars",
        "max_samples",
        "pad_to_multiple_of",
        "group_by_length",
        "collator",
        "cache_dir",
        "num_workers",
        "loader_workers",
        "curriculum",
        "augment",
    }
)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A hash of a fast tokenizer's full pipeline and special tokens; None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(backend.to_str().encode())
    extra = [type(tokenizer).__name__, tokenizer.eos_token_id]
    extra.append(getattr(tokenizer, "split_special_tokens", False))
    h.update(json.dumps(extra).encode())
    return h.hexdigest()


def fingerprint_matches(tokenizer: PreTrainedTokenizerBase, fingerprint: str) -> bool:
    """Whether `tokenizer` is the one `fingerprint` was taken of. Checkpoints store
    `tokenizer_fingerprint` (32 hex digits); those written before kiln 0.2 stored 16 hex
    digits of the sha256 of the backend's JSON, still recognised here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if len(fingerprint) == 16 and backend is not None:
        legacy = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
        return legacy == fingerprint
    return tokenizer_fingerprint(tokenizer) == fingerprint


def _code_hash() -> str:
    """The source of the tokenizing code: a change there may change the tokens or the layout."""
    h = hashlib.blake2b(digest_size=16)
    for module in (_tokenize_module, _dataset_module, _chat_module):
        h.update(Path(module.__file__ or "").read_bytes())
    return h.hexdigest()


def settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide how rendered texts become tokens: task and data options."""
    data = cfg.data.model_dump(mode="json", exclude=set(_NOT_IN_KEY))
    return {"task": cfg.task, "data": data}


def cache_key(texts: Sequence[tuple[str, ...]], fingerprint: str, config: dict[str, Any]) -> str:
    """Hex key of one dataset: its rendered texts, tokenizer fingerprint, settings and code."""
    h = hashlib.blake2b(digest_size=20)
    head = {"version": CACHE_VERSION, "tokenizer": fingerprint, "settings": config}
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(_code_hash().encode())
    for parts in texts:
        # Length-prefixed parts: ("ab", "c") and ("a", "bc") hash differently.
        h.update(len(parts).to_bytes(4, "little"))
        for part in parts:
            raw = part.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def _compact(t: torch.Tensor) -> torch.Tensor:
    # A view (the blocks of a packed stream) would save its whole storage; save just its data.
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def _state(ds: TokenDataset) -> dict[str, Any]:
    """The dataset's attributes (tensors, tuples of them, flags), shared tensors kept shared."""
    seen: dict[int, torch.Tensor] = {}

    def put(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return seen.setdefault(id(value), _compact(value))
        if isinstance(value, tuple):
            return tuple(put(v) for v in value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot cache a TokenDataset attribute of type {type(value).__name__}")

    return {name: put(value) for name, value in vars(ds).items()}


class WarningCapture(logging.Handler):
    """Collects the warnings logged while something cached is built (a dataset, a tokenizer),
    to repeat them on a cache hit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_entry(path: Path, key: str) -> tuple[TokenDataset, dict[str, Any]] | None:
    """The dataset and meta of the cache entry at `path`, or None if it is missing or unreadable.

    An unreadable entry (partial, corrupt, another version) is removed, with a warning.
    """
    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            raise ValueError("version or key mismatch")
        state = torch.load(path / "data.pt", map_location="cpu", weights_only=True)
        ds = TokenDataset.__new__(TokenDataset)
        ds.__dict__.update(state)
        ds._check_ids()
        if len(ds) != meta["examples"] or ds.num_tokens != meta["tokens"]:
            raise ValueError("size mismatch")
    except Exception as exc:  # any failure to read back means: rebuild
        log.warning("ignoring unreadable tokenization cache entry %s (%s); rebuilding", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return ds, meta


def _save(root: Path, key: str, ds: TokenDataset, meta: dict[str, Any]) -> None:
    """Write the entry into a temporary directory, then rename it to `root/key` (atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=root))
    try:
        torch.save(_state(ds), tmp / "data.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / key)  # fails if another process already put the entry there
    except OSError:
        if not (root / key).is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_dataset(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[tuple[str, ...]],
    build: Callable[[], TokenDataset],
    *,
    what: str = "data",
) -> TokenDataset:
    """The dataset `build()` makes of `texts`, from `cfg.data.cache_dir` when it is there.

    A hit loads the saved tensors (the tokenizer is not called) and repeats the warnings the
    build logged; a miss builds and saves. No caching with `data.cache_dir: null` or a
    tokenizer without a fingerprint (`tokenizer_fingerprint`). Failing to write the cache only
    logs a warning.

    Args:
        cfg: the run config (`data.cache_dir` and the settings in the key).
        tokenizer: the tokenizer `build` uses.
        texts: the rendered rows `build` tokenizes, one tuple of parts each.
        build: makes the dataset (on a miss).
        what: names the data in the log, e.g. "training data (train.jsonl)".
    """
    if cfg.data.cache_dir is None:
        return build()
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        log.debug("no tokenization cache: %s is not a fast tokenizer", type(tokenizer).__name__)
        return build()
    start = time.perf_counter()
    root = Path(cfg.data.cache_dir).expanduser()
    config = settings(cfg)
    if cfg.task == "chat":  # the template renders the conversations
        config["chat_template"] = getattr(tokenizer, "chat_template", None)
    key = cache_key(texts, fingerprint, config)
    entry = load_entry(root / key, key)
    if entry is not None:
        ds, meta = entry
        for message in meta.get("warnings", []):
            log.warning("%s", message)
        log.info(
            "tokenized data from cache %s: %s, %d examples, %d tokens (%.2fs)",
            root / key,
            what,
            len(ds),
            ds.num_tokens,
            time.perf_counter() - start,
        )
        return ds
    capture = WarningCapture()
    log.addHandler(capture)
    try:
        ds = build()
    finally:
        log.removeHandler(capture)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "examples": len(ds),
        "tokens": ds.num_tokens,
        "rows": len(texts),
        "settings": settings(cfg),
        "warnings": capture.messages,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        _save(root, key, ds, meta)
    except (OSError, TypeError, RuntimeError) as exc:
        log.warning("could not write the tokenization cache to %s: %s", root, exc)
    return ds
