"""A sweep in MLflow: one parent run that every trial's MLflow run nests under, holding the
sweep's definition and its best value so far (the W&B side is `log.wandb.group`)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kiln.sweep.study import Sweep

__all__ = ["PARENT_ATTR", "MlflowParent", "uses_mlflow"]

log = logging.getLogger("kiln")

PARENT_ATTR = "kiln.mlflow_parent_run"
"""The study's user attribute holding the parent run's id (one parent however many
controllers and agents join, and again when the sweep is continued)."""


def uses_mlflow(sweep: Sweep) -> bool:
    return "mlflow" in ((sweep.base.get("log") or {}).get("loggers") or [])


class MlflowParent:
    """The sweep's parent run: created once (its id kept in the study), RUNNING while a
    controller works, the best value logged as trials finish, FINISHED at the end."""

    def __init__(self, sweep: Sweep, study: Any) -> None:
        from mlflow import MlflowClient

        from kiln.callbacks.loggers.mlflow import default_tracking_uri
        from kiln.config import load_config

        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema-migration chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
        opts = load_config(data=sweep.base, overrides=sweep.grouping()).log.mlflow
        self.client = MlflowClient(tracking_uri=default_tracking_uri(opts, sweep.dir))
        self.metric = sweep.spec.metric
        self.bests = 0
        self.logged: float | None = None
        run_id, shared = study.user_attrs.get(PARENT_ATTR), True
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception:  # an agent with its own store (`--dir` on another machine)
                where = self.client.tracking_uri
                log.warning(
                    "sweep: the MLflow parent run %s is not in %s; this controller's "
                    "trials nest under a new one",
                    run_id,
                    where,
                )
                run_id, shared = None, False
        if run_id is None:
            run_id = self._create(sweep, opts.experiment)
            if shared:
                study.set_user_attr(PARENT_ATTR, run_id)
        self.run_id: str = run_id
        sweep.mlflow_parent = run_id

    def _create(self, sweep: Sweep, experiment_name: str) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(experiment_name)
        if found is None:  # the sweep's own store keeps its artifacts beside it
            local = sweep.mlflow_store and (sweep.dir.resolve() / "mlflow-artifacts").as_uri()
            experiment = self.client.create_experiment(experiment_name, artifact_location=local)
        else:
            experiment = found.experiment_id
        tags = {"kiln.sweep": sweep.name, "kiln.sweep_dir": str(sweep.dir)}
        run_id = self.client.create_run(experiment, run_name=sweep.name, tags=tags).info.run_id
        spec = sweep.spec.model_dump(mode="json")
        params = [Param(f"sweep.{k}", json.dumps(v)[:6000]) for k, v in spec.items()]
        self.client.log_batch(run_id, params=params)
        return run_id

    def best(self, value: float) -> None:
        """A new best value, at step = how many bests this controller has logged (a strictly
        increasing series: the last point is the best)."""
        self.bests += 1
        self._retry(
            "log the best",
            self.client.log_metric,
            self.run_id,
            f"best_{self.metric}",
            value,
            step=self.bests,
        )
        self.logged = value

    def end(self, finished: bool, best: float | None = None) -> None:
        """The run ended: FINISHED, or KILLED when the sweep was interrupted. `best`, the
        study's best, is logged first when the series does not end with it yet."""
        if best is not None and best != self.logged:
            self.best(best)
        status = "FINISHED" if finished else "KILLED"
        self._retry("end the run", self.client.set_terminated, self.run_id, status)

    def _retry(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        """MLflow's SQLite store is shared with the trials writing to it: a busy database is
        tried again (5 times, backing off); a failure at last is a warning, never a crash."""
        for attempt in range(5):
            try:
                call(*args, **kwargs)
                return
            except Exception as exc:
                error = exc
                time.sleep(0.5 * 2**attempt)
        log.warning("sweep: MLflow: could not %s: %s", what, str(error).splitlines()[0])
