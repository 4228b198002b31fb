"""What a sweep writes and shows: trials.csv, best.yaml, report.md, the summary, and
`kiln sweep status` / `report`."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import yaml

from kiln.config.yamlio import read_yaml_file
from kiln.errors import KilnError
from kiln.runs import PLOTS, REPORT, RunPaths  # a sweep names them as a run does
from kiln.sweep.study import (
    SURPLUS,
    Sweep,
    _optuna,
    open_study,
    sweep_from_dict,
)

__all__ = ["report", "status", "summarize", "write_outputs"]


# ---- outputs -------------------------------------------------------------------------------


def _rows(sweep: Sweep, study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in _trials_of(study):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "best_step": t.user_attrs.get("best_step"),
                "wall_s": round(t.user_attrs["wall_s"], 2) if "wall_s" in t.user_attrs else None,
                "run_dir": str(sweep.trial_dir(t.number)),
                "controller_rss_mb": t.user_attrs.get("controller_rss_mb"),
                **{f"params.{k}": v for k, v in t.params.items()},
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def _trials_of(study: Any) -> list[Any]:
    """The sweep's trials (without surplus ones)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]


def _best_trial(study: Any) -> Any | None:
    optuna = _optuna()
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: t.value)


def write_outputs(sweep: Sweep, study: Any, *, plots: bool = False) -> None:
    """trials.csv, best.yaml and report.md from the study (rewritten after every trial); with
    `plots` (the sweep's end, `kiln sweep report`) report.md's plots are drawn again too."""
    from kiln.files import write_atomic

    rows = _rows(sweep, study)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = sweep.dir / ".trials.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, sweep.dir / "trials.csv")
    best = _best_trial(study)
    if best is not None:
        written = RunPaths(sweep.trial_dir(best.number)).config
        if written.is_file():
            trial_cfg = read_yaml_file(written)
        else:  # run by an agent elsewhere (`--dir`): the base plus its values
            from kiln.config.run import apply_overrides

            trial_cfg = apply_overrides(dict(sweep.base), sweep.overrides(dict(best.params)))
        trial_cfg["output_dir"] = str(sweep.dir / "best")
        header = f"# The best trial ({best.number}) of sweep {sweep.name}: kiln train best.yaml\n"
        write_atomic(sweep.dir / "best.yaml", header + yaml.safe_dump(trial_cfg, sort_keys=False))
    drawn = None
    if plots and sweep.spec.plots:
        from kiln.sweep.plots import write_plots

        drawn = write_plots(study, sweep.dir / PLOTS, sweep.spec.metric)
    write_atomic(sweep.dir / REPORT, _markdown(sweep, rows, best, drawn))


def _markdown(
    sweep: Sweep,
    rows: list[dict[str, Any]],
    best: Any | None,
    drawn: list[tuple[str, str]] | None,
) -> str:
    spec = sweep.spec
    lines = [f"# Sweep report: {sweep.name}", ""]
    lines.append(
        f"{spec.method} search of {spec.metric} ({spec.mode}), {len(rows)} of {spec.trials} trials."
    )
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        lines += [
            "",
            f"Best: trial {best.number}, {spec.metric} {best.value:.6g} ({params}); "
            "`kiln train best.yaml` runs it again.",
        ]
    if rows:
        keys = [k for k in rows[0] if k.startswith("params.")]
        head = ["trial", "state", spec.metric, "best step", *(k[7:] for k in keys), "wall s"]
        lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        order = sorted(rows, key=lambda r: (r["value"] is None, r["value"] or 0.0))
        if spec.mode == "max":
            order = sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0.0)))
        for r in order:
            value = "" if r["value"] is None else f"{r['value']:.6g}"
            cells = [str(r["number"]), r["state"], value, str(r["best_step"] or "")]
            cells += [str(r.get(k, "")) for k in keys] + [str(r["wall_s"] or "")]
            lines.append("| " + " | ".join(cells) + " |")
    if drawn is None and sweep.spec.plots:
        lines += ["", "Plots are drawn when the sweep ends (or by `kiln sweep report DIR`)."]
    for title, what in drawn or []:
        shown = f"![{title}](plots/{what})" if what.endswith(".png") else what
        lines += ["", f"## {title}", "", shown]
    return "\n".join(lines) + "\n"


def summarize(sweep: Sweep, study: Any) -> dict[str, Any]:
    """Counts by state and the best trial."""
    counts: dict[str, int] = {}
    for t in _trials_of(study):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    best = _best_trial(study)
    return {
        "dir": str(sweep.dir),
        "trials": counts,
        "best": None
        if best is None
        else {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "run_dir": str(sweep.trial_dir(best.number)),
        },
    }


def _open_dir(directory: str | Path, storage: str | None) -> tuple[Sweep, Any]:
    directory = Path(directory)
    if not (directory / "sweep.yaml").is_file():
        raise KilnError(f"{directory}: not a sweep directory (no sweep.yaml)")
    raw = read_yaml_file(directory / "sweep.yaml")
    sweep = sweep_from_dict(raw, str(directory / "sweep.yaml"), directory)
    return sweep, open_study(sweep, storage)


def status(directory: str | Path, storage: str | None = None) -> str:
    """What `kiln sweep status DIR` prints: counts by state, the best trial, running trials."""
    from kiln.runs import read_status

    sweep, study = _open_dir(directory, storage)
    summary = summarize(sweep, study)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["trials"].items())) or "no trials"
    lines = [f"sweep {sweep.name} ({sweep.dir}): {counts} of {sweep.spec.trials}"]
    if summary["best"]:
        b = summary["best"]
        lines.append(
            f"best: trial {b['number']}, {sweep.spec.metric} {b['value']:.6g}, {b['params']}"
        )
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING":
            s = read_status(sweep.trial_dir(t.number)) or {}
            lines.append(
                f"trial {t.number}: {s.get('state', 'starting')} at step {s.get('step', 0)}"
            )
    return "\n".join(lines)


def report(directory: str | Path, storage: str | None = None) -> Path:
    """Rewrite trials.csv, best.yaml and report.md of a sweep directory; the report's path."""
    sweep, study = _open_dir(directory, storage)
    write_outputs(sweep, study, plots=True)
    return sweep.dir / REPORT
