"""`verify_export`: the parity checks of an export again, from what its directory holds.

Before anything is loaded, kiln_export.json is checked (its own checksum and the keys verify
reads) and every file it recorded against its size and sha256 (`kiln.export.meta`); then each
file is loaded with the onnxruntime and torch installed now. Whatever is damaged (missing,
truncated, edited, not what its name says) ends in a `KilnError` naming the file and what is
wrong with it; a format that loads and runs but no longer matches is a report whose `passed`
is false.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError, first_line
from kiln.export.graph import Runner, load_runner
from kiln.export.meta import PARITY, ExportMeta, absent, check_files, read_meta, versions
from kiln.export.parity import Case, compare, greedy_texts

__all__ = ["check_atol", "report_json", "summary_lines", "verify_export"]


def check_atol(atol: float) -> float:
    """`atol` if it is a finite number > 0.

    Raises:
        KilnError: naming --atol.
    """
    if not (math.isfinite(atol) and atol > 0):
        raise KilnError(f"--atol: must be a finite number > 0, got {atol:g}")
    return atol


def _parity_cases(directory: Path, meta: ExportMeta) -> list[tuple[Case, np.ndarray]]:
    """The saved parity inputs and PyTorch's logits, each checked for presence and shape."""
    from safetensors.numpy import load_file

    path = directory / PARITY
    if not path.is_file():
        raise KilnError(f"{path}: {absent(path)} (it holds the parity inputs and PyTorch's logits)")
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors' own error type, or an OSError
        raise KilnError(
            f"{path}: damaged: not a readable safetensors file ({first_line(exc)})"
        ) from None
    n_inputs = len(meta.signature.inputs)
    out = []
    for i, name in enumerate(meta.parity.cases):
        keys = [f"case{i}.input{j}" for j in range(n_inputs)] + [f"case{i}.logits"]
        missing = [k for k in keys if k not in saved]
        if missing:
            raise KilnError(f"{path}: damaged: no tensor {missing[0]} (case {name!r})")
        inputs, logits = [saved[k] for k in keys[:-1]], saved[keys[-1]]
        case = Case(name, inputs)
        problem = _shape_problem(case, logits)
        if problem:
            raise KilnError(f"{path}: damaged: case {name!r}: {problem}")
        out.append((case, logits))
    return out


def _shape_problem(case: Case, logits: np.ndarray) -> str | None:
    ids, mask = case.inputs[0], case.inputs[1]
    if any(x.ndim != 2 or x.dtype.kind not in "iu" for x in case.inputs):
        return "inputs must be 2-D integer arrays"
    if ids.shape != mask.shape:
        return f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ"
    query = case.inputs[-1] if len(case.inputs) == 3 else ids
    if logits.ndim != 3 or logits.shape[:2] != query.shape or logits.dtype.kind != "f":
        return f"logits of shape {list(logits.shape)} for inputs of shape {list(query.shape)}"
    return None


def _json_objects(directory: Path, names: list[str]) -> None:
    """Each of `names` that exists holds a JSON object (what transformers reads it as)."""
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KilnError(f"{path}: damaged: not a JSON file ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise KilnError(f"{path}: damaged: expected a JSON object, got {type(data).__name__}")


def _tokenizer_and_config(directory: Path, meta: ExportMeta) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from kiln.models.load import load_saved_tokenizer

    needed = ["config.json"]
    if meta.files is None or "tokenizer.json" in meta.files:  # sealed: as the export wrote it
        needed.append("tokenizer.json")
    for name in needed:
        if not (directory / name).is_file():
            raise KilnError(f"{directory / name}: {absent(directory / name)} (the export wrote it)")
    _json_objects(directory, [*needed, "tokenizer_config.json", "generation_config.json"])
    try:  # first: the tokenizer's loading reads config.json too, and would be blamed
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # transformers' own checks of each key, whatever they raise
        raise KilnError(f"{directory / 'config.json'}: damaged: {first_line(exc)[:300]}") from None
    try:
        tokenizer = load_saved_tokenizer(directory)
    except KilnError:
        raise
    except Exception as exc:  # a JSON object transformers cannot make a tokenizer of
        raise KilnError(
            f"{directory}: cannot load the tokenizer (tokenizer.json, "
            f"tokenizer_config.json): {first_line(exc)[:300]}"
        ) from None
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq != (len(meta.signature.inputs) == 3):
        raise KilnError(
            f"{directory / 'config.json'}: damaged: "
            f"{'an encoder-decoder' if seq2seq else 'a decoder-only'} model, but "
            f"kiln_export.json's signature has {len(meta.signature.inputs)} "
            "inputs"
        )
    return tokenizer, config


def _check_format(
    fmt: str, run: Runner, cases: list[tuple[Case, np.ndarray]], atol: float, greedy: Any
) -> dict[str, Any]:
    rows = []
    for case, ref in cases:
        try:
            got = run(*case.inputs)
        except Exception as exc:  # onnxruntime and torch raise their own types on bad inputs
            raise KilnError(
                f"{fmt}: cannot run the parity case {case.name!r}: {first_line(exc)[:300]}"
            ) from None
        row = {"case": case.name, **compare(ref, np.asarray(got), case.real)}
        row["passed"] = row["max_abs"] <= atol and row["argmax_equal"] == 1.0
        rows.append(row)
    try:
        texts = greedy(run)
    except KilnError:
        raise
    except Exception as exc:
        raise KilnError(f"{fmt}: greedy decoding failed: {first_line(exc)[:300]}") from None
    return {"cases": rows, "greedy_texts": texts}


def verify_export(directory: str | Path, atol: float | None = None) -> dict[str, Any]:
    """The parity checks again, on what `directory` holds (the inputs and PyTorch's logits
    saved at export, and its reference texts), with the onnxruntime and torch installed now:
    a report shaped like export_report.json (`passed` says it all). Nothing is written.

    Raises:
        KilnError: a bad `atol`, or a damaged export (one line naming the file and what is
            wrong with it).
    """
    directory = Path(directory)
    if atol is not None:
        check_atol(atol)
    if not directory.is_dir():
        why = "not a directory" if directory.exists() else "no such directory"
        raise KilnError(f"{directory}: {why} (--verify reads an export directory)")
    meta = read_meta(directory)
    check_files(directory, meta)
    atol = float(meta.parity.atol if atol is None else atol)
    cases = _parity_cases(directory, meta)
    tokenizer, config = _tokenizer_and_config(directory, meta)
    parity = meta.parity

    def greedy(run: Runner) -> list[str]:
        return greedy_texts(run, tokenizer, config, parity.prompts, parity.max_new_tokens)

    report: dict[str, Any] = {"atol": atol, "formats": {}}
    for fmt in meta.formats:
        result = _check_format(fmt, load_runner(fmt, directory), cases, atol, greedy)
        texts = result.pop("greedy_texts")
        equal = sum(a == b for a, b in zip(texts, parity.texts, strict=True))
        passed = all(r["passed"] for r in result["cases"]) and equal == len(texts)
        report["formats"][fmt] = {
            **result,
            "greedy": {"prompts": len(texts), "equal": equal},
            "passed": passed,
        }
    report["passed"] = all(e["passed"] for e in report["formats"].values())
    report["versions"] = versions()
    return report


def report_json(report: dict[str, Any]) -> str:
    """A report as JSON that strict parsers read: an infinite difference (a wrong shape, a
    non-finite logit) is written as null, not as the non-JSON `Infinity`."""

    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, list) else x

    return json.dumps(finite(report), indent=1)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per check of a verify (or export) report, and one for the whole."""
    atol = report["atol"]
    lines = []
    for fmt, entry in report["formats"].items():
        for c in entry["cases"]:
            mark = "ok" if c["passed"] else "FAILED"
            lines.append(
                f"{fmt}: {c['case']}: max abs diff {c['max_abs']:.2g} (atol {atol:g}), "
                f"argmax equal {c['argmax_equal']:.0%}: {mark}"
            )
        g = entry["greedy"]
        mark = "ok" if g["equal"] == g["prompts"] else "FAILED"
        lines.append(
            f"{fmt}: greedy decoding: {g['equal']} of {g['prompts']} texts equal PyTorch's: {mark}"
        )
    formats = ", ".join(report["formats"])
    ran = ", ".join(
        f"{k} {v}"
        for k, v in report.get("versions", {}).items()
        if v is not None and k in ("torch", "onnxruntime")
    )
    lines.append(
        f"verify: {'passed' if report['passed'] else 'FAILED'} ({formats})"
        + (f" with {ran}" if ran else "")
    )
    return lines
