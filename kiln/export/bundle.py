"""`export_model`: a run's model exported, checked against PyTorch, and written atomically;
`verify_export`: the checks again, from what the export directory holds.

An export directory holds the model file(s) of each format (`kiln.export.graph.FILES`), the
tokenizer, config.json and generation_config.json, `kiln_export.json` (the source, its
fingerprints, versions, opset, each format's attention implementation, the parity inputs'
names and the reference texts, and each file's size and sha256, sealed by a checksum of its
own: `kiln.export.meta`), `parity.safetensors` (the parity inputs and PyTorch's logits for
them, so `--verify` needs no source run) and `export_report.json`. `verify_export` lives in
`kiln.export.verify`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError, first_line
from kiln.export.graph import (
    FILES,
    FORMATS,
    Logits,
    check_opset,
    export_graph,
    input_names,
    load_runner,
    pytorch_runner,
    written_opset,
)
from kiln.export.meta import META, PARITY, REPORT, file_manifest, seal, sha256_file, versions
from kiln.export.parity import Case, cases, compare, greedy_texts
from kiln.export.verify import check_atol, report_json, verify_export

__all__ = ["DEFAULT_PROMPTS", "ParityFailed", "export_model", "verify_export"]

log = logging.getLogger("kiln")

DEFAULT_PROMPTS = ("Recipe for", "Ingredients:", "Preheat the oven", "The")
"""Greedy-decoding prompts when neither `--check-data` nor the run's data gives any."""


class ParityFailed(Exception):
    """An export out of tolerance: the one-line message and where the report was kept."""

    def __init__(self, message: str, report: Path) -> None:
        super().__init__(message)
        self.report = report


# ---- what is exported --------------------------------------------------------------------


def _source_info(where: Path, cfg: Any, kind: str) -> dict[str, Any]:
    """Where the weights came from, and fingerprints that tell whether they changed."""
    from kiln.config import config_hash
    from kiln.runs import MANIFEST, run_dir_of

    info: dict[str, Any] = {"path": str(where), "kind": kind}
    run = run_dir_of(where)
    info["run_dir"] = None if run is None else str(run)
    info["config_hash"] = None if cfg is None else config_hash(cfg)
    if (where / MANIFEST).is_file():  # a checkpoint: its manifest holds every file's checksum
        info["manifest_sha256"] = sha256_file(where / MANIFEST)
    weights = sorted(where.glob("*.safetensors"))
    info["weights_sha256"] = {p.name: sha256_file(p) for p in weights}
    return info


def _prompts(check_data: str | Path | None, cfg: Any, n: int) -> tuple[list[str], str]:
    """Prompts for greedy decoding, and where they came from: `check_data` (a text file, one
    prompt a line, or JSONL with prompt/source/text), else the run's validation data (the
    source or prompt of each row; a decoder's text cut to its first 6 words), else defaults."""
    if check_data is not None:
        path = Path(check_data)
        try:
            lines = [x for x in path.read_text().splitlines() if x.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise KilnError(f"--check-data: {path}: cannot read: {first_line(exc)}") from None
        prompts = []
        for number, line in enumerate(lines, 1):
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    line = next(row[k] for k in ("prompt", "source", "text") if k in row)
                except (ValueError, StopIteration, TypeError):
                    raise KilnError(
                        f"{path}:{number}: expected a JSON object with prompt, source or text"
                    ) from None
            prompts.append(str(line))
        if not prompts:
            raise KilnError(f"--check-data: {path}: no prompts in it")
        return prompts[:n], str(path)
    if cfg is not None:
        with contextlib.suppress(Exception):  # the data moved or changed: defaults instead
            from kiln.data import load_splits, make_format, render_rows

            train, val, _ = load_splits(cfg)
            rendered = render_rows(make_format(cfg), (val or train)[:n])
            if cfg.task == "causal_lm":
                prompts = [" ".join(parts[0].split()[:6]) for parts in rendered]
            else:
                prompts = [parts[0] for parts in rendered]
            if prompts:
                return prompts, "the run's validation data"
    return list(DEFAULT_PROMPTS[:n]), "default prompts"


# ---- export ------------------------------------------------------------------------------


def _check_formats(formats: Sequence[str]) -> list[str]:
    wanted = list(dict.fromkeys(formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise KilnError(
            f"--format: {', '.join(unknown) or 'none'} given; choose from {', '.join(FORMATS)}"
        )
    return wanted


def _default_out(where: Path) -> Path:
    from kiln.runs import RunPaths, run_dir_of

    run = run_dir_of(where)
    if run is None:
        raise KilnError(f"{where}: not inside a run directory; pass --out DIR")
    return RunPaths(run).export


def _refuse_overlap(target: Path, where: Path) -> None:
    from kiln.files import is_within
    from kiln.runs import RunPaths, run_dir_of

    run = run_dir_of(where)
    paths = [] if run is None else [RunPaths(run).final, RunPaths(run).checkpoints]
    for protected in [where, *paths]:
        if is_within(target, protected) or is_within(protected, target):
            raise KilnError(f"--out: {target} overlaps {protected}, which the export reads")


def _training_flags(model: Any) -> list[bool]:
    return [m.training for m in model.modules()]


def _attn(model: Any) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


@dataclass
class References:
    """What every format is checked against: PyTorch's logits on the parity cases and the
    texts `generate` decodes greedily from the prompts."""

    module: Logits
    tokenizer: Any
    cases: list[Case]
    logits: list[np.ndarray]
    prompts: list[str]
    texts: list[str]
    atol: float
    max_new_tokens: int

    def check(self, fmt: str, directory: Path) -> dict[str, Any]:
        """The parity of the exported `fmt` in `directory`."""
        run = load_runner(fmt, directory)
        rows = []
        for case, ref in zip(self.cases, self.logits, strict=True):
            row = {"case": case.name, **compare(ref, run(*case.inputs), case.real)}
            row["passed"] = row["max_abs"] <= self.atol and row["argmax_equal"] == 1.0
            rows.append(row)
        config = self.module.model.config
        texts = greedy_texts(run, self.tokenizer, config, self.prompts, self.max_new_tokens)
        equal = [a == b for a, b in zip(texts, self.texts, strict=True)]
        greedy = {"prompts": len(texts), "equal": sum(equal), "texts": texts}
        return {
            "cases": rows,
            "greedy": greedy,
            "passed": all(r["passed"] for r in rows) and all(equal),
        }


def export_model(
    source: str | Path,
    formats: Sequence[str] = ("onnx",),
    out: str | Path | None = None,
    *,
    opset: int = 18,
    atol: float = 1e-4,
    check_data: str | Path | None = None,
    prompts: int = 4,
    max_new_tokens: int = 16,
    overwrite: bool = False,
) -> Path:
    """Export the model at `source` (a run directory, final/, a checkpoint or a model
    directory) in each of `formats` into `out` (default `<run>/export`), after checking every
    format against PyTorch: logits within `atol` and the same argmax at the parity shapes,
    and the same greedy texts on `prompts` prompts. A LoRA adapter is merged in memory first.

    Returns the export directory. Raises `ParityFailed` when a format is out of tolerance
    (its report kept at `<out>.export_report.json`, no `out` written) and `KilnError` on bad
    input; `out` is replaced only by a complete, checked export, and only when it is empty
    or an earlier export (never a file, never another directory of the user's).
    """
    from kiln.files import resolve_path
    from kiln.models.load import resolve_model_path

    wanted = _check_formats(formats)
    check_atol(atol)
    if "onnx" in wanted:
        check_opset(opset)  # and the extra, before minutes of loading
    where = resolve_model_path(source)
    target = resolve_path(out if out is not None else _default_out(where), "--out")
    _refuse_overlap(target, where)
    _check_target(target, overwrite)
    work = _work_dir(target)  # --out writable, known before the model loads
    try:
        job = _Job(where, wanted, target, work, opset)
        _export_into(job, check_data, prompts, max_new_tokens, atol)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse an --out that is not a directory, or one that holds something other than an
    earlier export (which --overwrite would replace)."""
    if target.exists() and not target.is_dir():
        raise KilnError(f"--out: {target} exists and is not a directory")
    try:
        entries = [] if not target.exists() else list(target.iterdir())
    except OSError as exc:
        raise KilnError(f"--out: {target}: cannot read: {first_line(exc)}") from None
    if entries and not overwrite:
        raise KilnError(f"--out: {target} already exists; pass --overwrite or choose another")
    if entries and not (target / META).is_file():
        raise KilnError(
            f"--out: {target} is not an export (no {META}); --overwrite replaces "
            "only an earlier export: choose another directory"
        )


def _work_dir(target: Path) -> Path:
    """A fresh directory beside `target` to stage the export in (renamed into place)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.kiln-export-", dir=target.parent))
    except OSError as exc:
        raise KilnError(
            f"--out: cannot write in {target.parent}: {exc.strerror or first_line(exc)}"
        ) from None


@dataclass
class _Job:
    """Where an export reads from and writes to."""

    where: Path
    formats: list[str]
    target: Path
    work: Path
    opset: int


def _export_into(
    job: _Job, check_data: str | Path | None, prompts: int, max_new_tokens: int, atol: float
) -> None:
    """Load, export, check, and move the checked export into `job.target`."""
    import torch

    from kiln.files import fsync_tree, swap_dir, writing
    from kiln.models.generation import GenerationOptions, generate_texts, max_positions
    from kiln.models.load import load_trained

    loaded = load_trained(job.where)
    model = loaded.model
    merged = loaded.kind == "adapter"
    if merged:  # LoRA folded into its base: the export needs no PEFT
        model = model.merge_and_unload()
    model.eval()
    seq2seq = loaded.task == "seq2seq"
    vocab = int(model.get_output_embeddings().weight.shape[0])
    context = max_positions(model.config)
    module = Logits(model, seq2seq).eval()
    parity_cases = cases(seq2seq, vocab, context)
    flags = _training_flags(model)
    prompt_list, prompts_from = _prompts(check_data, loaded.cfg, prompts)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    with torch.no_grad():
        refs = References(
            module,
            loaded.tokenizer,
            parity_cases,
            [pytorch_runner(module)(*c.inputs) for c in parity_cases],
            prompt_list,
            generate_texts(model, loaded.tokenizer, prompt_list, options=options),
            atol,
            max_new_tokens,
        )

    staged = job.work / "new"
    staged.mkdir()
    report: dict[str, Any] = {"atol": atol, "formats": {}, "prompts_from": prompts_from}
    original = _attn(model)
    for fmt in job.formats:
        entry = _export_checked(fmt, refs, staged, vocab, context, job.opset, original)
        report["formats"][fmt] = entry
        if _training_flags(model) != flags:  # an exporter left a module in train mode
            raise KilnError(f"{fmt}: the export changed the model's train/eval mode")
    report["passed"] = all(e["passed"] for e in report["formats"].values())
    target = job.target
    sibling = target.parent / f"{target.name}.export_report.json"
    if not report["passed"]:
        sibling.write_text(report_json(report) + "\n")
        failed = [f for f, e in report["formats"].items() if not e["passed"]]
        raise ParityFailed(_failure_line(failed[0], report["formats"][failed[0]], atol), sibling)
    meta = {
        "source": _source_info(job.where, loaded.cfg, loaded.kind),
        "lora_merged": merged,
        "task": loaded.task,
        "signature": {
            "inputs": input_names(seq2seq),
            "outputs": ["logits"],
            "dynamic": ["batch", "sequence"],
            "max_sequence": context,
        },
        "opset": report["formats"].get("onnx", {}).get("opset"),  # as written, read back
        "versions": versions(),
    }
    with writing(f"the export {target}"):
        _write_rest(staged, loaded.tokenizer, refs, report, meta)
        fsync_tree(staged)
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        swap_dir(staged, target, job.work / "old")
    with contextlib.suppress(FileNotFoundError):
        sibling.unlink()  # a failed attempt's report is stale now


def _export_checked(
    fmt: str,
    refs: References,
    staged: Path,
    vocab: int,
    context: int | None,
    opset: int,
    original: str | None,
) -> dict[str, Any]:
    """Export one format and check it; when that fails with the model's attention, again
    with eager attention (recorded)."""
    model = refs.module.model
    tries = [original] if original in (None, "eager") else [original, "eager"]
    entry: dict[str, Any] = {"file": FILES[fmt]}
    for attn in tries:
        if attn != _attn(model) and attn is not None:
            model.set_attn_implementation(attn)
        start = time.perf_counter()
        try:
            export_graph(fmt, refs.module, staged, vocab=vocab, context=context, opset=opset)
            entry["export_s"] = round(time.perf_counter() - start, 2)
            entry.update(refs.check(fmt, staged))
            entry.pop("error", None)
        except KilnError:
            raise
        except Exception as exc:  # the exporter refused this attention implementation
            entry.update({"passed": False, "error": first_line(exc)[:500]})
        entry["attn_implementation"] = attn
        if entry["passed"]:
            break
        if attn != tries[-1]:
            entry["fallback_from"] = {
                "attn_implementation": attn,
                "why": entry.get("error") or "out of tolerance",
            }
            log.info("export: %s with %s attention failed; trying eager", fmt, attn)
    if original is not None and _attn(model) != original:
        model.set_attn_implementation(original)
    files = [p for p in staged.iterdir() if p.name.startswith(FILES[fmt])]
    entry["bytes"] = sum(p.stat().st_size for p in files)
    if fmt == "onnx" and (staged / FILES[fmt]).is_file():
        # The exporter keeps opset 18 when it cannot convert to the one asked for (a warning
        # only): what is recorded is what the file declares.
        entry["opset"] = written_opset(staged / FILES[fmt])
        if entry["opset"] != opset:
            log.warning(
                "onnx: opset %s asked for, but the exporter could not convert this "
                "model to it and wrote opset %s",
                opset,
                entry["opset"],
            )
    return entry


def _failure_line(fmt: str, entry: dict[str, Any], atol: float) -> str:
    if "error" in entry and "cases" not in entry:
        return f"{fmt}: the export failed: {entry['error']}"
    bad = [c for c in entry.get("cases", []) if not c["passed"]]
    if bad:
        c = bad[0]
        return (
            f"{fmt}: out of tolerance at {c['case']}: max abs difference {c['max_abs']:.3g} "
            f"(atol {atol:g}), argmax equal {c['argmax_equal']:.1%}"
        )
    g = entry["greedy"]
    differ = g["prompts"] - g["equal"]
    return f"{fmt}: greedy decoding differs from PyTorch on {differ} of {g['prompts']} prompts"


def _write_rest(
    staged: Path, tokenizer: Any, refs: References, report: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Everything beside the model files: tokenizer, configs, metadata, parity data, report."""
    import torch
    from safetensors.torch import save_file

    model = refs.module.model
    tokenizer.save_pretrained(staged)
    model.config.save_pretrained(staged)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staged)
    tensors = {}
    for i, (case, ref) in enumerate(zip(refs.cases, refs.logits, strict=True)):
        for j, x in enumerate(case.inputs):
            tensors[f"case{i}.input{j}"] = torch.from_numpy(np.ascontiguousarray(x))
        tensors[f"case{i}.logits"] = torch.from_numpy(np.ascontiguousarray(ref))
    save_file(tensors, str(staged / PARITY))
    formats = report["formats"]
    meta["formats"] = {
        f: {"file": e["file"], "attn_implementation": e["attn_implementation"]}
        for f, e in formats.items()
    }
    meta["parity"] = {
        "cases": [c.name for c in refs.cases],
        "atol": refs.atol,
        "prompts": refs.prompts,
        "texts": refs.texts,
        "max_new_tokens": refs.max_new_tokens,
    }
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["files"] = file_manifest(staged)  # what --verify checks before it loads anything
    (staged / META).write_text(json.dumps(seal(meta), indent=1) + "\n")
    (staged / REPORT).write_text(report_json(report) + "\n")
