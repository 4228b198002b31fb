"""MLflow (`pip install 'kiln[mlflow]'`): any tracking URI; by default an SQLite store in the
run directory (<run_dir>/mlflow.db, artifacts in <run_dir>/mlflow-artifacts)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.callbacks.loggers.base import ArtifactKind, RunContext, Status
from kiln.config.tracking import MlflowOptions
from kiln.runs import FINAL, PLOTS

__all__ = ["MlflowLogger", "default_tracking_uri"]

_MAX_PARAMS = 100  # per log_batch call (MLflow's limit)
_MAX_PARAM_LEN = 6000
# MLflow has no "paused": KILLED is its state of a run ended before its end.
_STATUS = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "diverged": "FAILED",
    "paused": "KILLED",
    "stopped": "KILLED",
}


def default_tracking_uri(opts: MlflowOptions, run_dir: Path) -> str:
    """`log.mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else <run_dir>/mlflow.db."""
    if opts.tracking_uri:
        return opts.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"


class MlflowLogger:
    """One MLflow run per kiln run; a resumed kiln run continues the same MLflow run."""

    name = "mlflow"

    def __init__(self, opts: MlflowOptions, ctx: RunContext) -> None:
        from mlflow import MlflowClient

        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema-migration chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.opts = opts
        self.tracking_uri = default_tracking_uri(opts, ctx.run_dir)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        local = not opts.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI")
        run_id = ctx.run_ids.get(self.name) if ctx.resumed else None
        self._existing: dict[str, str] = {}
        if run_id:
            run = self._client.get_run(run_id)
            self._existing = dict(run.data.params)
            self._client.update_run(run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(opts.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                # A run-dir store keeps its artifacts beside it, not in ./mlruns of the cwd.
                where = (ctx.run_dir.resolve() / "mlflow-artifacts").as_uri() if local else None
                experiment_id = self._client.create_experiment(
                    opts.experiment, artifact_location=where
                )
            tags = {"mlflow.parentRunId": opts.parent_run_id} if opts.parent_run_id else None
            run = self._client.create_run(
                experiment_id, run_name=opts.run_name or ctx.name, tags=tags
            )
            run_id = run.info.run_id
        self.run_id: str | None = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param: a resumed run adds only new keys.
        items = [
            Param(key, str(value)[:_MAX_PARAM_LEN])
            for key, value in params.items()
            if key not in self._existing
        ]
        for i in range(0, len(items), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, kind: ArtifactKind) -> None:
        if kind == "model":
            self._client.set_tag(self.run_id, "final_model", str(path))
            if self.opts.log_model:
                self._client.log_artifacts(self.run_id, str(path), FINAL)  # as in the run
        else:
            self._client.log_artifact(self.run_id, str(path), PLOTS if kind == "plot" else None)

    def close(self, status: Status) -> None:
        self._client.set_terminated(self.run_id, _STATUS[status])
