"""Curves from metrics.jsonl: per-run PNGs (plots/) and an overlay of several runs; the steps
of anomalies.jsonl (`train.anomaly`) are marked on the loss and gradient-norm curves, and
changes of world size (elastic runs) on the loss curve.

Drawn with matplotlib's Agg backend on standalone `Figure`s (no pyplot global state, no
display needed); matplotlib is the `plots` extra. Run directories are read through `kiln.runs`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln import runs
from kiln.errors import KilnError
from kiln.files import write_atomic
from kiln.registry import require_extra

__all__ = [
    "ANOMALY_LABEL",
    "anomaly_steps",
    "eval_metrics",
    "loss_figure",
    "mark_anomalies",
    "mark_world_sizes",
    "plot_run",
    "plot_runs",
    "read_metrics",
    "run_name",
    "series",
    "world_size_changes",
]

# Fields of val records that are not eval metrics of their own (`loss` repeats val_loss), and
# the suffixes of counts and timings (val_tokens, val_gen_samples, val_gen_samples_scored,
# val_gen_time_s).
_NOT_METRICS = {"step", "split", "epoch", "loss", "val_loss"}
_NOT_METRIC_SUFFIXES = ("_tokens", "_samples", "_scored", "_s")
_FIGSIZE = (6.4, 4.0)
ANOMALY_LABEL = "anomaly"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of <run_dir>/metrics.jsonl (a line torn by a kill is skipped).

    Raises:
        KilnError: there is no readable metrics.jsonl.
    """
    missing = KilnError(f"{run_dir}: not a kiln run directory (no metrics.jsonl)")
    if not runs.RunPaths(run_dir).metrics.is_file():
        raise missing
    try:
        records, _ = runs.read_metrics(run_dir, unterminated=True)
    except OSError:
        raise missing from None
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `split` that have a number there."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if r.get("split") == split and _is_number(value) and math.isfinite(value):
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def eval_metrics(records: list[dict[str, Any]]) -> list[str]:
    """Names of the numeric val metrics besides the loss (val_ppl, val_accuracy, ...), in order
    of first appearance; counts and timings are not metrics."""
    names: dict[str, None] = {}
    for r in records:
        if r.get("split") != "val":
            continue
        for key, value in r.items():
            if _is_number(value) and not (
                key in _NOT_METRICS or key.endswith(_NOT_METRIC_SUFFIXES)
            ):
                names.setdefault(key)
    return list(names)


def anomaly_steps(run_dir: str | Path) -> list[int]:
    """The distinct steps of the run's anomalies.jsonl, in order ([] without one)."""
    return sorted({int(r["step"]) for r in runs.read_anomalies(run_dir)})


def world_size_changes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The changes of world size metrics.jsonl records ({step, from, to, reason}), in order."""
    return [r for r in records if r.get("split") == "world_size" and _is_number(r.get("step"))]


def mark_world_sizes(ax: Any, changes: Sequence[dict[str, Any]]) -> Any:
    """Dashed vertical lines across `ax` where the world size changed, each with its "2→1"
    at the top; None when there are none."""
    if not changes:
        return None
    for c in changes:
        ax.annotate(
            f"{c.get('from')}→{c.get('to')}",
            (c["step"], 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -10),
            textcoords="offset points",
            fontsize=8,
            color="purple",
        )
    steps = [c["step"] for c in changes]
    style = {"colors": "purple", "linestyles": "--", "linewidth": 0.9, "label": "world size"}
    return ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), **style)


def mark_anomalies(ax: Any, steps: Sequence[int], **style: Any) -> Any:
    """Vertical lines across `ax` at the anomaly `steps` (one artist, labelled "anomaly" for
    the legend unless `style` gives another label); None when there are none."""
    if not steps:
        return None
    style = {"colors": "red", "linewidth": 0.8, "alpha": 0.6, "label": ANOMALY_LABEL, **style}
    return ax.vlines(list(steps), 0, 1, transform=ax.get_xaxis_transform(), **style)


def _figure(nrows: int = 1, ncols: int = 1) -> Any:
    # Without matplotlib: MissingExtra, a KilnError naming the `plots` extra (one line, exit 2
    # from `kiln plot`); PlotsCallback turns any failure to plot into a warning.
    figure = require_extra("matplotlib.figure", "plots", feature="plots")
    agg = require_extra("matplotlib.backends.backend_agg", "plots", feature="plots")
    single = nrows == ncols == 1
    # Fixed margins for one panel: constrained layout costs ~30 ms more per PNG.
    fig = figure.Figure(
        figsize=(_FIGSIZE[0] * ncols, _FIGSIZE[1] * nrows),
        layout=None if single else "constrained",
    )
    if single:
        fig.subplots_adjust(left=0.13, right=0.97, top=0.91, bottom=0.13)
    agg.FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(path, png.getvalue())
    return path


def _decorate(ax: Any, title: str, ylabel: str) -> None:
    ticker = require_extra("matplotlib.ticker", "plots", feature="plots")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))  # never 4.5
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _plot(ax: Any, steps: list[int], values: list[float], fmt: str, **style: Any) -> None:
    """`ax.plot`, with a marker when there is one point: a line of one point draws nothing."""
    if len(steps) == 1 and "o" not in fmt:
        style.setdefault("marker", "o")
    ax.plot(steps, values, fmt, **style)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png (train and val), lr.png, grad_norm.png (when logged) and one PNG per eval
    metric into `out_dir` (default <run_dir>/plots); returns the paths written."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else runs.RunPaths(run_dir).plots
    records = read_metrics(run_dir)
    name = run_name(run_dir)
    written = []

    anomalies = anomaly_steps(run_dir)
    written.append(_save(loss_figure(records, name, anomalies), out / "loss.png"))

    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm")):
        steps, values = series(records, "train", key)
        if not steps:
            continue
        fig = _figure()
        ax = fig.subplots()
        _plot(ax, steps, values, "-")
        if key == "grad_norm" and mark_anomalies(ax, anomalies) is not None:
            ax.legend()
        _decorate(ax, f"{name}: {title}", key)
        written.append(_save(fig, out / f"{key}.png"))

    for metric in eval_metrics(records):
        steps, values = series(records, "val", metric)
        if not steps:
            continue
        fig = _figure()
        ax = fig.subplots()
        ax.plot(steps, values, "o-", markersize=4)
        _decorate(ax, f"{name}: {metric}", metric)
        written.append(_save(fig, out / f"{metric}.png"))
    return written


def loss_figure(records: list[dict[str, Any]], name: str, anomalies: Sequence[int] = ()) -> Any:
    """The loss figure of one run (train solid, val dashed) with its anomaly steps marked
    (`mark_anomalies`) and its changes of world size (`mark_world_sizes`); a matplotlib
    `Figure`, not saved."""
    fig = _figure()
    ax = fig.subplots()
    for split, style in (("train", "-"), ("val", "o--")):
        steps, values = series(records, split, "loss")
        if steps:
            _plot(ax, steps, values, style, label=f"{split} loss", markersize=4)
    marked = mark_anomalies(ax, anomalies)
    marked = mark_world_sizes(ax, world_size_changes(records)) or marked
    _decorate(ax, f"{name}: loss", "loss")
    if ax.has_data() or marked is not None:
        ax.legend()
    return fig


def run_name(run_dir: Path) -> str:
    """The run's `name` from its config.yaml, else the directory name."""
    try:
        name = (runs.read_config_raw(run_dir) or {}).get("name")
    except KilnError:
        name = None
    return str(name) if name else run_dir.resolve().name


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short distinct names: the run names, else the directory names, else the paths."""
    for labels in ([run_name(p) for p in run_dirs], [p.resolve().name for p in run_dirs]):
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    metrics: Sequence[str] | None = None,
) -> Path:
    """One figure overlaying several runs: loss (train solid, val dashed; anomaly steps dotted
    vertical lines), LR and each eval metric (or just `metrics`, e.g. ["loss",
    "val_accuracy"]), one colour per run."""
    paths = [Path(p) for p in run_dirs]
    runs = [read_metrics(p) for p in paths]
    anomalies = [anomaly_steps(p) for p in paths]
    if metrics is None:
        names: dict[str, None] = {"loss": None, "lr": None}
        for records in runs:
            names.update(dict.fromkeys(eval_metrics(records)))
        panels = list(names)
    else:
        panels = list(metrics)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(nrows, ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for i, (label, records) in enumerate(zip(_labels(paths), runs, strict=True)):
            color = f"C{i % 10}"
            if panel == "loss":
                _plot(ax, *series(records, "train", "loss"), "-", color=color, label=label)
                ax.plot(*series(records, "val", "loss"), "o--", color=color, markersize=3)
                mark_anomalies(ax, anomalies[i], colors=color, linestyles=":", label="_nolegend_")
            elif panel in ("lr", "grad_norm", "tokens_per_s"):
                _plot(ax, *series(records, "train", panel), "-", color=color, label=label)
            else:
                ax.plot(*series(records, "val", panel), "o-", color=color, label=label, ms=3)
        marks = ", anomalies :" if any(anomalies) else ""
        title = f"loss (train -, val --{marks})" if panel == "loss" else panel
        _decorate(ax, title, panel)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif panel == panels[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, Path(out))
