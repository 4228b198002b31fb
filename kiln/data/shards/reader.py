"""`ShardSet`: a complete shard set (see `format.py`) read through memory maps.

Opening reads `manifest.json` and checks each file's size with one `stat` (or, with
`verify="full"`, its sha256): O(number of shards), no token is read. A shard's files are mapped
on the first access to one of its documents; a document is a view into the map, so memory is
the page cache's, not the process's. At most `max_open_shards` shards stay mapped (least
recently used first out): a map holds a file descriptor, and a set may have thousands of shards.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kiln.data.shards.format import (
    MANIFEST,
    MASK,
    MASK_DTYPE,
    OFFSET_DTYPE,
    OFFSETS,
    TOKENS,
    read_manifest,
)
from kiln.errors import KilnError

__all__ = ["ShardSet"]

Verify = Literal["size", "index", "full"]


class _Shard:
    """One shard's files."""

    def __init__(self, directory: Path, entry: dict[str, Any], dtype: np.dtype) -> None:
        self.entry = entry
        self.paths = {kind: directory / f["name"] for kind, f in entry["files"].items()}
        self.dtype = dtype

    def load(self) -> dict[str, np.ndarray]:
        """The shard's files mapped: {"tokens", "offsets"[, "mask"]} -> read-only arrays."""
        dtypes = {TOKENS[1:]: self.dtype, OFFSETS[1:]: OFFSET_DTYPE, MASK[1:]: MASK_DTYPE}
        maps = {kind: _map(path, dtypes[kind]) for kind, path in self.paths.items()}
        offsets = maps["offsets"]
        if offsets[0] != 0 or offsets[-1] != self.entry["tokens"]:
            raise KilnError(
                f"{self.paths['offsets']}: the document offsets do not span the shard's "
                f"{self.entry['tokens']} tokens (the file was altered); prepare the set again"
            )
        return maps


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """The file at `path` as a read-only array (an empty file, which mmap refuses, as [])."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class ShardSet:
    """The documents of a shard set, indexed globally (shard after shard, in writing order).

    Use `ShardSet.open(directory)`. `len(s)` is the number of documents, `s.doc(i)` document
    i's token ids and `s.mask(i)` its label mask (None for a set without masks), both
    read-only numpy views.
    """

    def __init__(
        self, directory: Path, manifest: dict[str, Any], *, max_open_shards: int = 64
    ) -> None:
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be positive, not {max_open_shards}")
        self.directory = directory
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.has_masks: bool = manifest["has_masks"]
        self.tokens_per_shard: list[int] = [s["tokens"] for s in manifest["shards"]]
        """Tokens of each shard, in order."""
        self.documents_per_shard: list[int] = [s["documents"] for s in manifest["shards"]]
        """Documents of each shard, in order."""
        # _starts[k]: global index of shard k's first document (a bisect finds a document's shard)
        self._starts = [0, *itertools.accumulate(self.documents_per_shard)]
        # _token_starts[k]: global offset of shard k's first token (the shards end to end)
        self._token_starts = [0, *itertools.accumulate(self.tokens_per_shard)]
        self._shards = [_Shard(directory, s, self.dtype) for s in manifest["shards"]]
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        """The mapped shards, least recently used first."""

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        expect_key: str | None = None,
        expect_tokenizer: Any = None,
        verify: Verify = "size",
        max_open_shards: int = 64,
    ) -> ShardSet:
        """Open the complete shard set in `directory` (reads no tokens).

        Args:
            directory: the set's directory (holding `manifest.json`).
            expect_key: the content key the set must have (`shard_key`), or None.
            expect_tokenizer: a tokenizer, or its `tokenizer_fingerprint`, that must be the
                one the set was made with; None: not checked.
            verify: "size" checks each file's size against the manifest (one stat each);
                "index" also the sha256 of the offset files (8 bytes a document: what
                training opens a set with); "full" the sha256 of every file (reads every
                byte).
            max_open_shards: how many shards stay mapped at once (two or three file
                descriptors each); a view of an evicted shard stays valid.

        Raises:
            KilnError: one line naming the file: no or an invalid manifest (an incomplete set),
                a shard file missing or truncated, altered (sha256, with verify="full"), another
                tokenizer's set, another key.
        """
        if verify not in ("size", "index", "full"):
            raise ValueError(f"verify must be 'size', 'index' or 'full', not {verify!r}")
        directory = Path(directory)
        manifest = read_manifest(directory)
        where = directory / MANIFEST
        if expect_key is not None and manifest["key"] != expect_key:
            raise KilnError(
                f"{where}: the shard set has key {manifest['key']}, not the expected "
                f"{expect_key} (it was made from other sources or settings)"
            )
        if expect_tokenizer is not None:
            _check_tokenizer(where, manifest["tokenizer_fingerprint"], expect_tokenizer)
        for shard in manifest["shards"]:
            for kind, f in shard["files"].items():
                full = verify == "full" or (verify == "index" and kind == OFFSETS[1:])
                _check_file(directory / f["name"], f, full=full)
        return cls(directory, manifest, max_open_shards=max_open_shards)

    # ---- sizes -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole set."""
        return int(self.manifest["tokens"])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.manifest["tokenizer_fingerprint"]

    # ---- documents ---------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, document in it) of global document `index` (negative: from the end)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"document {index} of a shard set of {n}")
        index %= n
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _maps(self, shard: int) -> dict[str, np.ndarray]:
        maps = self._open.get(shard)
        if maps is not None:
            self._open.move_to_end(shard)
            return maps
        maps = self._open[shard] = self._shards[shard].load()
        if len(self._open) > self.max_open_shards:
            # views handed out keep their map alive; the set just stops holding it
            self._open.popitem(last=False)
        return maps

    def shard_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """Shard `shard`'s files as read-only arrays: {"tokens", "offsets"[, "mask"]} (its
        documents are `offsets.size - 1` consecutive global ones; see `documents_per_shard`)."""
        if not 0 <= shard < len(self._shards):
            raise IndexError(f"shard {shard} of a shard set of {len(self._shards)}")
        return self._maps(shard)

    def _span(self, index: int) -> tuple[dict[str, np.ndarray], int, int]:
        shard, local = self.locate(index)
        maps = self._maps(shard)
        start, end = int(maps["offsets"][local]), int(maps["offsets"][local + 1])
        if not 0 <= start <= end <= maps["tokens"].size:
            raise KilnError(
                f"{self._shards[shard].paths['offsets']}: document {local} spans "
                f"[{start}, {end}) outside the shard's tokens (the file was altered)"
            )
        return maps, start, end

    def doc(self, index: int) -> np.ndarray:
        """Document `index`'s token ids: a read-only view into its shard's map."""
        maps, start, end = self._span(index)
        return maps["tokens"][start:end]

    def mask(self, index: int) -> np.ndarray | None:
        """Document `index`'s label mask (uint8, 1 = trained on), or None without masks."""
        if not self.has_masks:
            return None
        maps, start, end = self._span(index)
        return maps["mask"][start:end]

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with the set's tokens from global token offset `start` on (the shards'
        tokens end to end, in order), across shard boundaries as needed."""
        pos, n = start, out.size
        done = 0
        while done < n:
            shard = bisect.bisect_right(self._token_starts, pos) - 1
            if not 0 <= shard < len(self._shards):
                raise IndexError(f"token {pos} of a shard set of {self.num_tokens}")
            local = pos - self._token_starts[shard]
            tokens = self._maps(shard)["tokens"]
            take = min(n - done, tokens.size - local)
            out[done : done + take] = tokens[local : local + take]
            done += take
            pos += take

    def document_lengths(self) -> np.ndarray:
        """Every document's token count, (len(self),) int64, in order: read from the shards'
        offset files (8 bytes a document; no token is read)."""
        lengths = np.empty(len(self), dtype=np.int64)
        for k, shard in enumerate(self._shards):
            offsets = _map(shard.paths["offsets"], OFFSET_DTYPE)
            if offsets.size != self.documents_per_shard[k] + 1:
                raise KilnError(
                    f"{shard.paths['offsets']}: {offsets.size - 1} documents, the manifest says "
                    f"{self.documents_per_shard[k]} (the file was altered); prepare the set again"
                )
            lengths[self._starts[k] : self._starts[k + 1]] = np.diff(offsets)
        return lengths

    def __getstate__(self) -> dict[str, Any]:
        # maps are not pickled (a memmap would pickle its bytes): a copy maps them again
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.directory)!r}, {len(self)} documents, {self.num_tokens} "
            f"tokens, {self.num_shards} shards, {self.dtype.name})"
        )


def _check_tokenizer(where: Path, recorded: str | None, expect: Any) -> None:
    if isinstance(expect, str):
        want: str | None = expect
    else:  # a tokenizer: its fingerprint, by the tokenization cache's one definition
        from kiln.data.cache import tokenizer_fingerprint

        want = tokenizer_fingerprint(expect)
    if want != recorded:
        raise KilnError(
            f"{where}: the shards were made with another tokenizer (fingerprint {recorded}, "
            f"this one is {want}); prepare them again with this tokenizer"
        )


def _check_file(path: Path, entry: dict[str, Any], *, full: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise KilnError(f"{path}: shard file missing; prepare the set again") from None
    except OSError as exc:
        raise KilnError(f"{path}: cannot read the shard file ({exc.strerror})") from None
    if size != entry["bytes"]:
        raise KilnError(
            f"{path}: shard file of {size} bytes, the manifest says {entry['bytes']} "
            "(truncated or altered); prepare the set again"
        )
    if full:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise KilnError(
                f"{path}: shard file altered (its sha256 differs from the manifest's); "
                "prepare the set again"
            )
