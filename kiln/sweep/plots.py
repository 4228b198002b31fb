"""The sweep's plots for report.md, drawn by Optuna's matplotlib backend: optimization
history, parallel coordinates, parameter importance and intermediate values (the validations
each trial reported, where pruning acted)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.registry import MissingExtra, require_extra

__all__ = ["PLOTS", "write_plots"]

log = logging.getLogger("kiln")

PLOTS = {
    "history": ("Optimization history", "plot_optimization_history", 1),
    "parallel": ("Parallel coordinates", "plot_parallel_coordinate", 2),
    "importance": ("Parameter importance", "plot_param_importances", 2),
    "intermediate": ("Validations per trial", "plot_intermediate_values", 1),
}
"""name: (title, the function of optuna.visualization.matplotlib, completed trials it needs)."""


@contextlib.contextmanager
def _agg() -> Iterator[Any]:
    """pyplot on the Agg backend (Optuna draws with pyplot), the caller's backend restored."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("Agg")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every plot
            yield plt
    finally:
        plt.close("all")
        with contextlib.suppress(Exception):
            plt.switch_backend(before)


def write_plots(study: Any, out_dir: Path, metric: str) -> list[tuple[str, str]]:
    """Draw the plots into `out_dir` (PNG); for each, (title, file name or why it is missing).
    Missing matplotlib is one line in the report, not an error: the sweep's results stand."""
    try:
        require_extra("matplotlib", "plots", feature="drawing them")
    except MissingExtra as exc:
        return [("Plots", f"not drawn: {exc}")]
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as views

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    trials = study.get_trials(deepcopy=False)
    params = {k for t in trials for k in t.params}
    reported = any(t.intermediate_values for t in trials)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    with _agg() as plt:
        for name, (title, function, needs) in PLOTS.items():
            if complete < needs:
                drawn.append((title, f"not drawn: it needs {needs} completed trials"))
                continue
            if name == "parallel" and len(params) < 2:
                drawn.append((title, "not drawn: the space has one key"))
                continue
            if name == "intermediate" and not reported:
                drawn.append((title, "not drawn: no trial reported a validation"))
                continue
            draw: Callable[..., Any] = getattr(views, function)
            try:
                axes = draw(study, target_name=metric) if name != "intermediate" else draw(study)
            except Exception as exc:  # Optuna refuses (too few distinct values, one param)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                drawn.append((title, f"not drawn: {reason}"))
                continue
            figure = getattr(axes, "figure", None) or plt.gcf()
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            figure.savefig(out_dir / f"{name}.png", dpi=96)
            plt.close(figure)
            drawn.append((title, f"{name}.png"))
    return drawn
