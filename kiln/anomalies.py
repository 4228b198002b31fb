"""Views of a run's anomalies.jsonl (`kiln.runs.read_anomalies`, written under `train.anomaly`):
one-line descriptions and a summary for `kiln report`, and the training samples of an anomalous
step for `kiln data show`.

A sample is shown by its source row when the run recorded one (unpacked data: `file:line`, the
line read back from the data file), else by its tokens, decoded from the training data rebuilt
from the run's config.yaml with the run's tokenizer (final/, else rebuilt as the config says and
checked against the newest checkpoint's fingerprint). The sample indices are those of the run's
training set, so the data must be what the run read: a rebuilt set of another size is refused.

Light to import (kiln.runs and the standard library): only decoding loads torch, transformers
and the data pipeline.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, first_line
from kiln.runs import (
    RunPaths,
    list_checkpoints,
    read_anomalies,
    read_config_raw,
    read_status,
)

__all__ = [
    "MAX_CHARS",
    "Decoded",
    "Shown",
    "action_text",
    "decode_samples",
    "describe",
    "format_value",
    "read_source_rows",
    "show_anomalies",
    "summarize",
    "value_text",
]

MAX_CHARS = 400
"""Default length a sample's content is cut to."""

_WHERE = re.compile(r"(.+):(\d+)")  # file:line (columnar rows are name#index)
_ACTIONS = {"skip": "skipped", "rollback": "rolled back", "stop": "stopped", "warn": "warned"}
_BOM = b"\xef\xbb\xbf"


# ---- one record, and all of them -------------------------------------------------------------


def format_value(value: Any) -> str:
    """A loss or gradient norm as shown: 4 significant digits; "nan", "inf" as written."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def value_text(record: dict[str, Any]) -> str:
    """The value, with a spike's z-score: `nan`, `9.5 (z 21.4)`."""
    value = format_value(record.get("value"))
    z = record.get("z")
    if isinstance(z, int | float) and not isinstance(z, bool):
        value += f" (z {z:.1f})"
    return value


def action_text(record: dict[str, Any]) -> str:
    """The action, with a rollback's target: `skip`, `rollback to step 4`."""
    action = str(record.get("action"))
    if action == "rollback" and record.get("to_step") is not None:
        return f"rollback to step {record['to_step']}"
    return action


def describe(record: dict[str, Any]) -> str:
    """One line: `step 7: nan_loss nan, skip (epoch 0, micro-step 13, 8 samples)`."""
    where = [f"epoch {record.get('epoch')}"]
    if record.get("micro_step") is not None:
        where.append(f"micro-step {record['micro_step']}")
    samples = record.get("samples") or []
    where.append(f"{len(samples)} sample{'' if len(samples) == 1 else 's'}")
    return (
        f"step {record.get('step')}: {record.get('kind')} {value_text(record)}, "
        f"{action_text(record)} "
        f"({', '.join(where)})"
    )


def summarize(records: list[dict[str, Any]], status: dict[str, Any] | None = None) -> str:
    """One line: how many anomalies of which kind, what was done, and the verdict of a run
    that diverged (status.json's stop reason)."""
    n = len(records)
    spikes = sum(r.get("kind") == "spike" for r in records)
    kinds = [f"{n - spikes} non-finite"] if n > spikes else []
    kinds += [f"{spikes} spike{'' if spikes == 1 else 's'}"] if spikes else []
    head = f"{n} anomal{'y' if n == 1 else 'ies'} ({', '.join(kinds)})"
    actions = Counter(str(r.get("action")) for r in records)
    done = [f"{count} {_ACTIONS.get(a, a)}" for a, count in sorted(actions.items())]
    line = f"{head}: {', '.join(done)}" if done else head
    if status is not None and status.get("state") == "diverged":
        stop = status.get("stop")
        reason = stop.get("reason") if isinstance(stop, dict) else None
        line += f"; the run diverged: {reason}" if reason else "; the run diverged"
    return line


# ---- source rows -----------------------------------------------------------------------------


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(max_chars - 1, 0)] + "…"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _read_lines(path: Path, wanted: set[int]) -> dict[int, tuple[int, bytes]]:
    """(byte offset, raw line) of each wanted 1-based line, reading the file once (lines split
    at \\n, as kiln's readers number them)."""
    found: dict[int, tuple[int, bytes]] = {}
    last = max(wanted)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno in wanted:
                found[lineno] = (offset, raw.removeprefix(_BOM) if lineno == 1 else raw)
            if lineno >= last:
                break
            offset += len(raw)
    return found


def _row_content(path: Path, offset: int, raw: bytes, header: list[str] | None) -> str:
    """A source row as compact JSON when it is a JSON object (a JSONL line, an object of a
    JSON list starting on this line) or a CSV record, else the line as written."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    stripped = text.strip()
    try:
        value = json.loads(stripped.rstrip(","))  # an object of a JSON list ends with a comma
    except ValueError:
        value = None
    if value is None and stripped.startswith("{"):  # a multi-line object of a JSON file
        with open(path, "rb") as f:
            f.seek(offset)
            rest = f.read().decode("utf-8", errors="replace")
        try:
            value, _ = json.JSONDecoder().raw_decode(rest.lstrip())
        except ValueError:
            value = None
    if isinstance(value, dict):
        return _compact(value)
    if header is not None:
        record = next(csv.reader([text]), [])
        if len(record) == len(header):
            return _compact(dict(zip(header, record, strict=True)))
    return text


def _csv_header(path: Path) -> list[str] | None:
    if path.suffix.lower() != ".csv":
        return None
    with open(path, "rb") as f:
        for raw in f:
            text = raw.removeprefix(_BOM).decode("utf-8", errors="replace")
            if text.strip():
                return next(csv.reader([text.rstrip("\r\n")]), None)
    return None


def read_source_rows(sources: Sequence[str], max_chars: int = MAX_CHARS) -> dict[str, str]:
    """The content of each `file:line` source row, cut to `max_chars`: a JSON object (JSONL,
    JSON) or CSV record as compact JSON, another line (text) as written. Sources that are not
    `file:line` (rows of a dataset or Parquet file, `name#index`) are left out.

    Raises:
        KilnError: a file that is missing or unreadable, or shorter than a line named (the
            data changed since the run), naming the file.
    """
    by_file: dict[Path, set[int]] = {}
    for where in sources:
        m = _WHERE.fullmatch(where)
        if m is not None:
            by_file.setdefault(Path(m.group(1)), set()).add(int(m.group(2)))
    out: dict[str, str] = {}
    for path, wanted in by_file.items():
        try:
            lines = _read_lines(path, wanted)
            header = _csv_header(path)
            for lineno in sorted(wanted):
                if lineno not in lines:
                    raise KilnError(
                        f"{path}: has no line {lineno} (the data changed since the run)"
                    )
                offset, raw = lines[lineno]
                content = _row_content(path, offset, raw, header)
                out[f"{path}:{lineno}"] = _clip(content, max_chars)
        except FileNotFoundError:
            raise KilnError(
                f"{path}: no such file (a source of the run's samples; relative paths are "
                "read from the directory the run was started in)"
            ) from None
        except OSError as exc:
            raise KilnError(f"{path}: cannot read ({first_line(exc)})") from None
    return out


# ---- decoded samples -------------------------------------------------------------------------


def _tokenizer(cfg: Any, paths: RunPaths, train_rows: list[Any]) -> tuple[Any, str]:
    """The run's tokenizer and where it came from: final/, else built as the config says (a
    trained one retrained on the same rows), checked against the newest checkpoint."""
    from kiln.models.build import LOAD_ERRORS, load_failure
    from kiln.models.tokenizer import build_tokenizer, ensure_pad_token

    final = paths.final
    if (final / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(final))
        except LOAD_ERRORS as exc:
            raise KilnError(f"{final}: cannot load the tokenizer: {load_failure(exc)}") from None
        ensure_pad_token(tokenizer)
        return tokenizer, str(final)
    texts = None
    if cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None:
        from kiln.data import make_format, render_rows

        texts = ["\n".join(parts) for parts in render_rows(make_format(cfg), train_rows)]
    tokenizer = build_tokenizer(cfg, texts)
    for entry in reversed(list_checkpoints(paths.root)):
        if not entry.complete:
            continue
        state_file = entry.path / "trainer_state.json"
        try:
            want = json.loads(state_file.read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not an object
            raise KilnError(f"{state_file}: unreadable: {first_line(exc)}") from None
        from kiln.data.cache import fingerprint_matches

        if want is not None and not fingerprint_matches(tokenizer, want):
            raise KilnError(
                f"{entry.path}: the tokenizer rebuilt from the config is not the one the run "
                "trained with"
            )
        break
    return tokenizer, "rebuilt from the config"


def _train_examples(paths: RunPaths) -> int:
    """The run's count of training examples (data_stats.json), which the rebuilt data must
    match. The engine writes it only for data built from the config: without it, the run
    trained on data given as Python objects, which the config cannot rebuild."""
    file = paths.data_stats
    try:
        count = json.loads(file.read_text()).get("train_examples")
    except FileNotFoundError:
        raise KilnError(
            f"{file}: no such file: the run's training data was not built from its config "
            "(given as Python objects?), so its samples cannot be rebuilt"
        ) from None
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not an object
        raise KilnError(f"{file}: unreadable: {first_line(exc)}") from None
    if not isinstance(count, int):
        raise KilnError(f"{file}: no train_examples count")
    return count


@dataclass
class Decoded:
    """Training samples decoded from the data rebuilt from a run's config."""

    texts: dict[int, str]
    """Sample index -> its decoded tokens (seq2seq: `source => target`)."""
    note: str
    """How they were rebuilt (for the output's first line)."""


def decode_samples(run_dir: str | Path, indices: Sequence[int]) -> Decoded:
    """Rebuild the run's training data from its config.yaml and decode the samples `indices`
    (global indices into the training set, as anomalies.jsonl records them).

    Raises:
        KilnError: no config.yaml or data_stats.json (data given as Python objects), data
            that cannot be read (as `kiln train` says), a rebuilt training set of another size
            than the run's (data_stats.json), an index out of range, or a tokenizer that is
            not the run's.
    """
    from kiln.config import config_from_dict
    from kiln.data import build_datasets, load_splits

    paths = RunPaths(run_dir)
    raw = read_config_raw(paths.root) if paths.config.is_file() else None
    if raw is None:
        raise KilnError(f"{paths.config}: no such file (needed to rebuild the training data)")
    cfg = config_from_dict(raw, str(paths.config))
    ran = _train_examples(paths)
    train_rows, _, stats = load_splits(cfg)
    tokenizer, origin = _tokenizer(cfg, paths, train_rows)
    train, _, _ = build_datasets(cfg, tokenizer, train_rows, [], stats=stats)
    if ran != len(train):
        raise KilnError(
            f"{paths.config}: the training data rebuilt from it has {len(train):,} examples, "
            f"the run had {ran:,} ({paths.data_stats}): the data changed since the run"
        )
    texts = {}
    for i in indices:
        if not 0 <= i < len(train):
            raise KilnError(
                f"{paths.anomalies}: sample {i} is out of range: the training data rebuilt "
                f"from {paths.config} has {len(train):,} examples"
            )
        example = train[i]
        text = tokenizer.decode(example["input_ids"].tolist())
        if cfg.task == "seq2seq" and "labels" in example:
            target = [t for t in example["labels"].tolist() if t >= 0]
            text = f"{text} => {tokenizer.decode(target)}"
        texts[i] = text
    layout = "packed blocks" if train.blocks is not None else "one example per row"
    note = (
        f"decoded from the training data rebuilt from {paths.config} "
        f"({len(train):,} examples, {layout}; tokenizer: {origin})"
    )
    if cfg.data.augment:
        note += "; before data.augment"
    return Decoded(texts, note)


# ---- kiln data show --------------------------------------------------------------------------


@dataclass
class Shown:
    """What `kiln data show` prints for the anomalies of one step (`show_anomalies`)."""

    records: list[dict[str, Any]]
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _checked_run(run_dir: str | Path) -> RunPaths:
    paths = RunPaths(run_dir)
    if not paths.root.is_dir():
        raise KilnError(f"{paths.root}: no such run directory")
    if not paths.is_run():
        raise KilnError(f"{paths.root}: not a kiln run directory (no config.yaml or status.json)")
    if not paths.anomalies.is_file():
        raise KilnError(f"{paths.anomalies}: no such file (the run recorded no anomaly)")
    return paths


def show_anomalies(
    run_dir: str | Path,
    step: int | None = None,
    *,
    max_chars: int = MAX_CHARS,
    max_samples: int | None = None,
    decode: bool = False,
) -> Shown:
    """The anomalies of `step` in a run, each with its samples: index, source row (`file:line`)
    and that row's content, or the sample's decoded tokens where the run recorded no source
    (packed data) or `decode` asks for them. `step` None: one line per anomaly, no samples.

    Raises:
        KilnError: not a run directory, no anomalies.jsonl, no anomaly at `step` (naming the
            steps that have one), or samples that cannot be read back (`read_source_rows`,
            `decode_samples`).
    """
    paths = _checked_run(run_dir)
    records = read_anomalies(paths.root)
    if not records:
        raise KilnError(f"{paths.anomalies}: holds no anomaly record")
    if step is None:
        lines = [describe(r) for r in records]
        lines.append(f"{summarize(records, read_status(paths.root))}; see one with --step N")
        return Shown(records, lines)
    chosen = [r for r in records if r.get("step") == step]
    if not chosen:
        steps = ", ".join(str(s) for s in sorted({int(r["step"]) for r in records}))
        raise KilnError(f"{paths.anomalies}: no anomaly at step {step} (anomalies at: {steps})")

    plan: list[tuple[dict[str, Any], list[tuple[int, str | None]], int]] = []
    for record in chosen:
        samples = [int(s) for s in record.get("samples") or []]
        sources = record.get("sources")
        if not isinstance(sources, list) or len(sources) != len(samples):
            sources = [None] * len(samples)
        pairs = list(zip(samples, sources, strict=True))
        keep = pairs if max_samples is None else pairs[:max_samples]
        plan.append((record, keep, len(pairs) - len(keep)))
    wanted = [where for _, pairs, _ in plan for _, where in pairs if where is not None]
    rows = read_source_rows(wanted, max_chars)
    undecoded = sorted(
        {i for _, pairs, _ in plan for i, where in pairs if decode or where not in rows}
    )
    decoded = decode_samples(paths.root, undecoded) if undecoded else None

    lines = [] if decoded is None else [f"samples {decoded.note}"]
    for record, pairs, more in plan:
        lines.append(describe(record))
        for index, where in pairs:
            lines.append(f"  sample {index}" + (f"  {where}" if where else ""))
            if where in rows:
                lines.append(f"    {rows[where]}")
            if decoded is not None and index in decoded.texts:
                text = _compact(_clip(decoded.texts[index], max_chars))
                lines.append(f"    tokens: {text}" if where in rows else f"    {text}")
        if more:
            lines.append(f"  ... and {more} more sample{'' if more == 1 else 's'} (--samples)")
    return Shown(chosen, lines)
