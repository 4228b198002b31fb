"""The on-disk layout of a token shard set: file names, dtypes, the manifest, the content key.

A shard set is one directory::

    manifest.json              written last, atomically: the set is complete iff it is valid
    shard-00000.tokens         token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    shard-00000.offsets        raw little-endian int64, documents + 1 values: document d of the
                               shard is tokens[offsets[d]:offsets[d + 1]]; offsets[0] == 0 and
                               offsets[-1] == the shard's token count
    shard-00000.mask           (sets with masks only) raw uint8, one per token: 1 = trained on
                               (instruction: the response; seq2seq: a document is the source's
                               ids then the target's, 0 on the source, 1 on the target)
    shard-00000.done           while writing only: the shard's manifest entry, written after its
                               files; a rerun keeps the shards that have one (`ShardWriter.resume`)

docs/data.md ("Token shards") describes it for other tools.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "dtype_for",
    "read_manifest",
    "shard_key",
    "shard_name",
    "source_identity",
]

FORMAT = "kiln-token-shards"
FORMAT_VERSION = 1
"""The layout written here; bump it when a file or a manifest field changes meaning."""

MANIFEST = "manifest.json"
TOKENS, OFFSETS, MASK, DONE = ".tokens", ".offsets", ".mask", ".done"
OFFSET_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")

# The manifest's top-level fields and their JSON types (checked on open).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "dtype": str,
    "vocab_size": int,
    "tokenizer_fingerprint": (str, type(None)),
    "key": str,
    "has_masks": bool,
    "documents": int,
    "tokens": int,
    "shards": list,
}
_SHARD_FIELDS: dict[str, type] = {"name": str, "documents": int, "tokens": int, "files": dict}


def dtype_for(vocab_size: int) -> np.dtype:
    """The token dtype of a vocabulary: little-endian uint16 when its ids fit, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, not {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    """The stem of shard `index`'s files: `shard-00000` (five digits, more past 99999)."""
    return f"shard-{index:05d}"


def source_identity(path: str | os.PathLike[str], *, content: bool = False) -> dict[str, Any]:
    """What a source file contributes to the content key.

    By default its resolved path, size and `mtime_ns` (one `stat`, as make and rsync decide):
    editing the file changes the key, copying it elsewhere or touching it does too; a rewrite
    that keeps both size and mtime is not seen. `content=True` hashes the bytes instead
    (sha256; reads the whole file) so a key survives a copy or a touch.

    Raises:
        KilnError: naming the file when it is missing or unreadable.
    """
    resolved = Path(os.fspath(path)).expanduser().resolve()
    try:
        st = resolved.stat()
        if not content:
            return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise KilnError(f"{resolved}: cannot read the source file ({exc.strerror})") from None
    return {"path": str(resolved), "size": st.st_size, "sha256": h.hexdigest()}


def shard_key(
    source_identities: Sequence[Mapping[str, Any]],
    data_config: Mapping[str, Any],
    tokenizer_fingerprint: str | None,
    version: int | str = FORMAT_VERSION,
) -> str:
    """Hex key (40 digits) of the shards made from these sources, settings and tokenizer.

    Args:
        source_identities: `source_identity(path)` of each source file, in reading order (the
            order is part of the key: it is the documents' order).
        data_config: the JSON-able settings that decide the tokens (filters, template, ...).
        tokenizer_fingerprint: `kiln.data.cache.tokenizer_fingerprint(tokenizer)`.
        version: the version of the code that makes the tokens (bump to invalidate).
    """
    head = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "sources": [dict(s) for s in source_identities],
        "data": dict(data_config),
        "tokenizer": tokenizer_fingerprint,
    }
    try:
        text = json.dumps(head, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shard_key: the settings are not plain JSON ({exc})") from None
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _check_fields(obj: Any, fields: Mapping[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a JSON object")
    for name, kind in fields.items():
        value = obj.get(name)
        # bool is an int in Python: a count must not be a bool, a flag must be one
        if (
            name not in obj
            or not isinstance(value, kind)
            or (kind is int and isinstance(value, bool))
        ):
            raise ValueError(f"{where}: field {name!r} is missing or not a {_kind(kind)}")


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check_shard(i: int, shard: Any, manifest: dict[str, Any]) -> None:
    """Shard `i`'s entry is well formed and its files' sizes agree with its counts (so a reader
    that checked the sizes on disk can trust every offset's range)."""
    _check_fields(shard, _SHARD_FIELDS, f"shard {i}")
    docs, tokens = shard["documents"], shard["tokens"]
    if docs < 1 or tokens < 0:
        raise ValueError(f"shard {i}: {docs} documents, {tokens} tokens")
    sizes = {
        TOKENS: tokens * np.dtype(manifest["dtype"]).itemsize,
        OFFSETS: (docs + 1) * OFFSET_DTYPE.itemsize,
        MASK: tokens * MASK_DTYPE.itemsize,
    }
    for kind in (TOKENS, OFFSETS) + ((MASK,) if manifest["has_masks"] else ()):
        entry = shard["files"].get(kind[1:])
        _check_fields(entry, {"name": str, "bytes": int, "sha256": str}, f"shard {i}")
        if Path(entry["name"]).name != entry["name"]:  # never outside the directory
            raise ValueError(f"shard {i}: file name {entry['name']!r} is not plain")
        if entry["bytes"] != sizes[kind]:
            raise ValueError(
                f"shard {i}: {entry['name']} of {entry['bytes']} bytes for {docs} "
                f"documents, {tokens} tokens"
            )


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated manifest of the shard set in `directory`.

    Raises:
        KilnError: one line naming manifest.json when it is missing (the set is incomplete:
            its writer did not finish), not JSON, of another format or version, or malformed.
    """
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(
            f"{path}: no manifest: the shard set is missing or incomplete (its writer did "
            "not finish); prepare it again"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KilnError(f"{path}: not a valid shard manifest ({exc})") from None
    try:
        _check_fields(manifest, _FIELDS, "manifest")
        if manifest["format"] != FORMAT or manifest["version"] != FORMAT_VERSION:
            raise ValueError(
                f"format {manifest['format']!r} version {manifest['version']}, this kiln "
                f"reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        if manifest["dtype"] != dtype_for(manifest["vocab_size"]).name:
            raise ValueError(f"dtype {manifest['dtype']!r} does not fit the vocabulary size")
        for i, shard in enumerate(manifest["shards"]):
            _check_shard(i, shard, manifest)
        if (
            sum(s["documents"] for s in manifest["shards"]) != manifest["documents"]
            or sum(s["tokens"] for s in manifest["shards"]) != manifest["tokens"]
        ):
            raise ValueError("the shards' counts do not add up to the totals")
    except ValueError as exc:
        raise KilnError(f"{path}: not a valid shard manifest ({exc})") from None
    return manifest
