"""`kiln_export.json`: what an export directory holds, sealed so that `--verify` can say which
file was damaged.

The export records each file it wrote (`files`: bytes and sha256) and a checksum of the
metadata itself (`meta_sha256`: sha256 of the canonical JSON of every other key). `--verify`
checks both before it loads anything, so a truncated, edited or missing file is named as such
instead of failing (or, worse, passing) a parity check. An export written before these keys
existed is still read: its files are then only checked by loading them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import KilnError, first_line

__all__ = [
    "META",
    "PARITY",
    "REPORT",
    "ExportMeta",
    "absent",
    "check_files",
    "file_manifest",
    "read_meta",
    "seal",
    "sha256_file",
    "versions",
]

META, REPORT, PARITY = "kiln_export.json", "export_report.json", "parity.safetensors"
UNSEALED = (META, REPORT)
"""Files not in the manifest: the metadata (sealed by its own checksum) and the report (not
read back by `--verify`)."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """The versions of what exports and runs the formats (None: not installed)."""
    import torch
    import transformers

    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """`{name: {"bytes", "sha256"}}` of every file in `directory` but META and REPORT."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in UNSEALED
    }


def absent(path: Path) -> str:
    """Why a file kiln needs is not there: "missing", or "not a file" when something else
    (a directory) holds its name."""
    return "not a file" if path.exists() else "missing"


def _canonical_sha256(meta: dict[str, Any]) -> str:
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with `meta_sha256`, the checksum `read_meta` compares."""
    return {**meta, "meta_sha256": _canonical_sha256(meta)}


# ---- the schema --verify relies on ---------------------------------------------------------


class _Part(BaseModel):
    # strict: a "16" where 16 was written is damage, not something to coerce
    model_config = ConfigDict(extra="allow", strict=True)


class FormatMeta(_Part):
    file: str
    attn_implementation: str | None = None


class ParityMeta(_Part):
    cases: list[str] = Field(min_length=1)
    atol: float
    prompts: list[str]
    texts: list[str]
    max_new_tokens: int = Field(ge=1, le=4096)

    @field_validator("atol")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a finite number > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _a_text_per_prompt(self) -> ParityMeta:
        if len(self.texts) != len(self.prompts):
            raise ValueError(
                f"parity: {len(self.prompts)} prompts but {len(self.texts)} reference texts"
            )
        return self


class SignatureMeta(_Part):
    inputs: list[Literal["input_ids", "attention_mask", "decoder_input_ids"]]

    @field_validator("inputs")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        allowed = (
            ["input_ids", "attention_mask"],
            ["input_ids", "attention_mask", "decoder_input_ids"],
        )
        if v not in allowed:
            raise ValueError(f"expected {allowed[0]} or {allowed[1]}, got {v}")
        return v


class FileEntry(_Part):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExportMeta(_Part):
    """The keys of kiln_export.json that `--verify` reads (others are kept, unchecked)."""

    formats: dict[Literal["onnx", "torchscript", "pt2"], FormatMeta] = Field(min_length=1)
    parity: ParityMeta
    signature: SignatureMeta
    files: dict[str, FileEntry] | None = None
    meta_sha256: str | None = None

    @field_validator("files")
    @classmethod
    def _plain_names(cls, v: dict[str, FileEntry] | None) -> dict[str, FileEntry] | None:
        for name in v or {}:
            if name in ("", ".", "..") or Path(name).name != name:
                raise ValueError(f"{name!r} is not a file name")
        return v


def read_meta(directory: Path) -> ExportMeta:
    """kiln_export.json of `directory`, parsed, checked against its checksum and the schema.

    Raises:
        KilnError: one line per problem, naming the file and the key.
    """
    from kiln.config.base import format_errors
    from kiln.export.graph import FILES

    path = directory / META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KilnError(f"{path}: missing: not a kiln export directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: cannot read: {first_line(exc)}") from None
    except ValueError as exc:
        raise KilnError(f"{path}: damaged: not JSON ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise KilnError(f"{path}: damaged: expected a JSON object, got {type(raw).__name__}")
    sealed = raw.get("meta_sha256")
    if sealed is not None and sealed != _canonical_sha256(raw):
        raise KilnError(
            f"{path}: damaged: its content does not match its checksum "
            "(meta_sha256), so it changed since the export"
        )
    try:
        meta = ExportMeta.model_validate(raw)
    except ValidationError as err:
        raise KilnError(f"{path}: damaged: {_one_line(format_errors(err))}") from None
    wrong = [
        f"formats.{f}.file: {e.file!r}, expected {FILES[f]!r}"
        for f, e in meta.formats.items()
        if e.file != FILES[f]
    ]
    if wrong:
        raise KilnError(f"{path}: damaged: {_one_line(wrong)}")
    return meta


def _one_line(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def check_files(directory: Path, meta: ExportMeta) -> None:
    """Each file the export recorded is there, of its size and checksum.

    Raises:
        KilnError: one line per damaged or missing file, saying what is wrong with it.
    """
    problems = []
    for name, entry in (meta.files or {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: {absent(path)} (the export wrote {entry.bytes} bytes)")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            how = "truncated" if size < entry.bytes else "grown"
            problems.append(
                f"{path}: damaged: {how} to {size} bytes (the export wrote {entry.bytes})"
            )
        elif sha256_file(path) != entry.sha256:
            problems.append(
                f"{path}: damaged: its content changed since the export "
                f"(sha256 differs from {META}'s)"
            )
    if len(problems) > 1:  # one line: the first damaged file, and how many more
        problems[0] += f" (and {len(problems) - 1} more damaged or missing files)"
    if problems:
        raise KilnError(problems[0])
