"""Run report: a summary table of one run directory, printed and written as report.md.

Reads only files of the run directory (config.yaml, summary.json, metrics.jsonl, status.json,
anomalies.jsonl, plots/, through `kiln.runs`), so it works on a finished, failed, diverged, paused
or still-running run; what a run has not written yet is reported as missing, not guessed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.anomalies import action_text, summarize, value_text
from kiln.errors import KilnError
from kiln.plots import eval_metrics, read_metrics, series
from kiln.runs import RunPaths, read_anomalies, read_config_raw, read_status, read_summary

__all__ = ["RunReport", "best_metrics", "load_report", "render_markdown", "render_table"]

# Metrics where smaller is better; every other eval metric counts larger as better.
_LOWER_IS_BETTER = re.compile(r"loss|ppl|perplexity|error|wer|cer", re.IGNORECASE)
_MAX_ANOMALY_ROWS = 50  # rows of the anomalies table; the summary line counts them all
_ANOMALY_COLUMNS = ("step", "kind", "value", "action", "samples")


@dataclass
class RunReport:
    """What `kiln report` shows about one run directory."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    """summary.json; None while the run has not finished (running, failed or killed)."""
    records: list[dict[str, Any]]
    rows: list[tuple[str, str]] = field(default_factory=list)
    """(label, value) lines of the summary table."""
    best: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Each eval metric's best value and its step."""
    plots: list[Path] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    """anomalies.jsonl (`kiln.runs.read_anomalies`); empty when the run recorded none."""
    anomaly_summary: str | None = None
    """One line: counts by kind and action, and the verdict of a run that diverged."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """The reports `kiln eval` wrote into the run's eval/ directory, oldest first."""

    def eval_table(self) -> list[tuple[str, ...]]:
        """A header row, then one row per `kiln eval` report: weights, data, examples and
        every metric (in the order `kiln eval` reports them: the loss metrics first)."""
        names: list[str] = []
        for report in self.evals:
            names += [k for k in report["metrics"] if k not in names]
        rows = [("weights", "data", "examples", *names)]
        for report in self.evals:
            model = Path(str(report.get("model", "?")))
            run = self.run_dir.resolve()
            where = os.path.relpath(model, run) if model.is_relative_to(run) else str(model)
            metrics = report["metrics"]
            values = [_num(metrics[k]) if k in metrics else "" for k in names]
            rows.append(
                (where, str(report.get("data", "?")), _num(report.get("examples")), *values)
            )
        return rows

    def anomaly_rows(self) -> list[tuple[str, ...]]:
        """(step, kind, value, action, samples) of the first anomalies, as text."""
        rows = []
        for r in self.anomalies[:_MAX_ANOMALY_ROWS]:
            samples = r.get("samples")
            count = len(samples) if isinstance(samples, list) else 0
            rows.append(
                (str(r.get("step")), str(r.get("kind")), value_text(r), action_text(r), str(count))
            )
        return rows


def best_metrics(records: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """(best value, step) of val_loss and each eval metric; loss, perplexity and error rates
    are better smaller, the others larger (accuracy, BLEU, ROUGE)."""
    best: dict[str, tuple[float, int]] = {}
    for name in ["val_loss", *eval_metrics(records)]:
        steps, values = series(records, "val", name)
        if not values:
            continue
        pick = min if _LOWER_IS_BETTER.search(name) else max
        value = pick(values)
        best[name] = (value, steps[values.index(value)])
    return best


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e12:  # an untrained model's perplexity; throughput never gets here
        return f"{value:.3e}"
    return f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:,.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02.0f}s"
    return f"{minutes}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def _config_rows(cfg: dict[str, Any], summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    model, data = cfg.get("model", {}), cfg.get("data", {})
    optim, train = cfg.get("optim", {}), cfg.get("train", {})
    lora = cfg.get("lora", {})
    if model.get("name_or_path"):
        what = str(model["name_or_path"])
    else:
        what = (
            f"{model.get('arch')} from scratch ({model.get('num_layers')} layers, "
            f"hidden {model.get('hidden_size')})"
        )
    if lora.get("enabled"):
        what += f" + LoRA (r={lora.get('r')}, alpha={lora.get('alpha')})"
    if summary and summary.get("parameters") is not None:
        what += (
            f"; {_num(summary['parameters'])} parameters, "
            f"{_num(summary.get('trainable_parameters'))} trainable"
        )
    batch = (
        f"{train.get('batch_size')} x {train.get('grad_accum_steps', 1)} accumulation, "
        f"max_length {data.get('max_length')}"
    )
    schedule = (
        f"{optim.get('name', 'adamw')} lr {optim.get('lr')}, {optim.get('scheduler')} "
        f"(warmup {_warmup(optim)}), weight decay {optim.get('weight_decay')}"
    )
    device = summary.get("device") if summary else train.get("device")
    return [
        ("run", f"{cfg.get('name')} ({cfg.get('task')})"),
        ("model", what),
        ("data", f"{data.get('train')}" + (f" (val: {data['val']})" if data.get("val") else "")),
        ("optimizer", schedule),
        ("batch", batch),
        ("precision", f"{train.get('precision')} on {device}"),
    ]


def load_report(run_dir: str | Path) -> RunReport:
    """Gather the report of `run_dir` (KilnError when it is not a kiln run directory)."""
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    if not run_dir.is_dir():
        raise KilnError(f"{run_dir}: no such run directory")
    config = read_config_raw(run_dir) if paths.config.is_file() else None
    if config is None:
        raise KilnError(f"{run_dir}: not a kiln run directory (no config.yaml)")
    records = read_metrics(run_dir) if paths.metrics.exists() else []
    summary = read_summary(run_dir)
    report = RunReport(run_dir=run_dir, config=config, summary=summary, records=records)
    report.best = best_metrics(records)
    report.anomalies = read_anomalies(run_dir)
    if report.anomalies:
        report.anomaly_summary = summarize(report.anomalies, read_status(run_dir))
    report.evals = _read_evals(paths.eval)
    first = {"loss": 0, "lr": 1, "grad_norm": 2}
    pngs = paths.plots.glob("*.png")
    report.plots = sorted(pngs, key=lambda p: (first.get(p.stem, 3), p.stem))

    rows = _config_rows(config, summary)
    total = config.get("train", {}).get("max_steps")
    if summary is not None:
        steps = f"{_num(summary.get('steps'))}"
        if summary.get("stop_reason"):
            steps += f" (stopped: {summary['stop_reason']})"
        rows += [
            ("steps", steps),
            ("tokens", _num(summary.get("tokens"))),
            ("wall time", _duration(summary.get("wall_time_s"))),
            ("tokens/s", _num(summary.get("tokens_per_s"), 1)),
        ]
    else:
        train = [r for r in records if r.get("split") == "train"]
        last = train[-1] if train else {}
        rows += [
            ("status", "no summary.json: still running, failed or killed"),
            ("steps", f"{_num(last.get('step'))} logged" + (f" of {total}" if total else "")),
            ("tokens", _num(last.get("tokens"))),
            ("wall time", _duration(last.get("elapsed_s"))),
            ("tokens/s", _num(last.get("tokens_per_s"), 1)),
        ]
    train_steps, train_loss = series(records, "train", "loss")
    if train_loss:
        rows.append(("final train loss", f"{_num(train_loss[-1])} (step {train_steps[-1]})"))
    for name, (value, step) in report.best.items():
        rows.append((f"best {name}", f"{_num(value)} (step {step})"))
    final = summary.get("final_dir") if summary else None
    if final is None and paths.final.is_dir():
        final = str(paths.final)
    rows.append(("final model", final or "not written"))
    if summary and summary.get("resumed_from"):
        rows.append(("resumed from", str(summary["resumed_from"])))
    if report.anomaly_summary:
        rows.append(("anomalies", report.anomaly_summary))
    changes = [r for r in records if r.get("split") == "world_size"]
    if changes:  # an elastic run: nodes left or joined (marked on the loss plot too)
        told = [
            f"{c.get('from')} -> {c.get('to')} at step {c.get('step')} ({c.get('reason')})"
            for c in changes
        ]
        rows.append(("world size", ", ".join(told)))
    report.rows = rows
    return report


def _read_evals(folder: Path) -> list[dict[str, Any]]:
    """The `kiln eval` reports in `folder`, oldest first (files that are not one are skipped:
    the folder is the user's too)."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and isinstance(report.get("metrics"), dict):
            found.append((str(report.get("time", "")), path.stat().st_mtime_ns, report))
    return [report for *_, report in sorted(found, key=lambda f: f[:2])]


def _aligned(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def _more_anomalies(report: RunReport) -> list[str]:
    more = len(report.anomalies) - _MAX_ANOMALY_ROWS
    return [f"... and {more} more in {RunPaths(report.run_dir).anomalies}"] if more > 0 else []


def render_table(report: RunReport) -> str:
    """The summary table as aligned plain text, then the anomalies (when the run had any)."""
    width = max(len(label) for label, _ in report.rows)
    lines = [f"{label:<{width}}  {value}" for label, value in report.rows]
    if report.anomalies:
        lines += ["", "Anomalies", *_aligned([_ANOMALY_COLUMNS, *report.anomaly_rows()])]
        lines += _more_anomalies(report)
    if report.evals:
        lines += ["", "kiln eval results", *_aligned(report.eval_table())]
    return "\n".join([f"run directory: {report.run_dir}", *lines])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: RunReport) -> str:
    """report.md: the table, the plots (paths relative to the run directory) and the sample."""
    name = report.config.get("name", report.run_dir.name)
    lines = [f"# Run report: {name}", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(label)} | {_cell(value)} |" for label, value in report.rows]
    if report.plots:
        lines += ["", "## Curves", ""]
        for png in report.plots:
            rel = os.path.relpath(png, report.run_dir)
            lines += [f"### {png.stem}", "", f"![{png.stem}]({rel})", ""]
    if report.anomalies:
        lines += ["", "## Anomalies", "", str(report.anomaly_summary), ""]
        lines += ["| " + " | ".join(_ANOMALY_COLUMNS) + " |", "|---" * len(_ANOMALY_COLUMNS) + "|"]
        lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in report.anomaly_rows()]
        lines += _more_anomalies(report)
        lines += ["", "See a step's samples with `kiln data show RUN_DIR --step N`."]
    if report.evals:
        header, *rows = report.eval_table()
        lines += ["", "## kiln eval results", "", "| " + " | ".join(header) + " |"]
        lines += [
            "|---" * len(header) + "|",
            *("| " + " | ".join(map(_cell, r)) + " |" for r in rows),
        ]
    sample = report.summary.get("sample") if report.summary else None
    if sample:
        lines += ["", "## Sample", "", "```text", sample.rstrip(), "```"]
    return "\n".join(lines).rstrip() + "\n"


def _warmup(optim: dict[str, Any]) -> str:
    """Warmup as configured: steps, or a fraction of the run."""
    ratio = optim.get("warmup_ratio")
    return f"{ratio:g} x steps" if ratio is not None else str(optim.get("warmup_steps"))
