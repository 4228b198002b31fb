"""The controller: trials as `kiln train` subprocesses, followed through their run
directories, reported to the study, pruned by SIGUSR1, resumed after an interruption."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiln.config import ConfigError, load_config
from kiln.errors import KilnError, first_line
from kiln.files import write_atomic
from kiln.runs import ExitCode, MetricsTail, RunPaths
from kiln.sweep.outputs import _best_trial, summarize, write_outputs
from kiln.sweep.study import (
    SURPLUS,
    Sweep,
    _distributions,
    _optuna,
    load_sweep,
    open_study,
)
from kiln.sweep.tracking import MlflowParent, uses_mlflow

__all__ = ["SWEEP_ATTR", "Controller", "agent", "run"]

log = logging.getLogger("kiln")
_POLL_S = 0.25


# ---- one trial -----------------------------------------------------------------------------


def _val_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation records among metrics.jsonl's (`kiln.runs.MetricsTail`)."""
    return [r for r in records if r.get("split") == "val"]


def _best(records: list[dict[str, Any]], metric: str, mode: str) -> tuple[float | None, int | None]:
    """The best value of `metric` over a run's validations (its current history: what a
    rollback dropped is not in it), and its step."""
    scored = [(r[metric], r["step"]) for r in _val_rows(records) if _finite(r.get(metric))]
    if not scored:
        return None, None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda vs: vs[0])


_OWNER = {"host": socket.gethostname(), "pid": os.getpid()}
"""The controller that runs a trial (a trial user attribute): another controller of the same
study leaves its trials alone while it lives."""


def _owned_elsewhere(trial: Any, run_dir: Path) -> bool:
    """Whether a running trial belongs to a live controller (not this one): on this machine
    its pid runs; on another, the trial's run is alive (status.json's heartbeat), or it was
    asked for less than 10 minutes ago and has not started writing yet."""
    from kiln.runs import is_alive, pid_running, read_status

    owner = trial.user_attrs.get("controller") or {}
    if owner == _OWNER:
        return False
    if owner.get("host") == socket.gethostname():
        return isinstance(owner.get("pid"), int) and pid_running(owner["pid"])
    status = read_status(run_dir)
    if status is not None:
        return is_alive(status)
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return time.time() - started < 600


class _Voice:
    """The sweep's notifications: once per sweep (start, each new best, end), through the
    base config's `notify.senders` and `notify.events`; the trials themselves send none."""

    def __init__(self, sweep: Sweep) -> None:
        from kiln.callbacks.notify import Outbox, build_senders

        self.sweep = sweep
        self.cfg = load_config(data=sweep.base).notify
        senders = build_senders(self.cfg) if self.cfg.senders else []
        # The run's delivery (kiln.callbacks.notify): a lane per sender, its retries and
        # backoff, one warning for a sender that keeps failing; the controller never waits.
        self.outbox = Outbox(senders, self.cfg) if senders else None
        self.best: float | None = None

    def send(self, event: str, message: str, done: int, **metrics: float) -> None:
        """Queue the note (when `notify.events` has it); "end", the sweep's last, then waits
        for every note to be delivered (at most `notify.flush_timeout_s`)."""
        from kiln.callbacks.notify import Notification

        if self.outbox is None:
            return
        if event in self.cfg.events:
            spec = self.sweep.spec
            note = Notification(
                event, self.sweep.name, message, done, spec.trials, str(self.sweep.dir), metrics
            )
            self.outbox.send(note)
        if event == "end":
            self.outbox.flush()

    def trial_done(self, number: int, value: float | None, done: int) -> bool:
        """A new best (in the sweep's direction) is news; whether it was one."""
        better = value is not None and (
            self.best is None
            or (value < self.best if self.sweep.spec.mode == "min" else value > self.best)
        )
        if better:
            self.best = value
            metric = self.sweep.spec.metric
            message = (
                f"sweep {self.sweep.name}: trial {number} is the best so far, {metric} {value:.6g}"
            )
            self.send("best", message, done, **{metric: float(value)})
        return better


def _rss_mb() -> float:
    """The controller's resident memory now (Linux), else its peak (which, on Linux, a
    process started by a bigger one inherits across exec, so it is not read there)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _value(row: dict[str, Any], metric: str) -> Any:
    """`metric` in a validation record; NaN for null (not a finite number: NaN, inf)."""
    value = row.get(metric)
    return math.nan if value is None and metric in row else value


def _report_again(trial: Any, value: float, step: int) -> None:
    """Report `value` at a `step` reported before: `Trial.report` keeps a step's first value
    (and warns), but a rollback dropped that validation, so the new one replaces it in the
    storage and in the trial's own copy, which the pruner reads."""
    trial.storage.set_trial_intermediate_value(trial._trial_id, step, value)
    trial._cached_frozen_trial.intermediate_values[step] = value


@dataclass
class _Trial:
    number: int
    params: dict[str, Any]
    resume: bool = False
    proc: subprocess.Popen | None = None
    pruned: bool = False
    nonfinite: bool = False
    """A validation of the metric was NaN or inf: pruned at once, as diverged."""
    reported: set[int] = field(default_factory=set)
    redo: set[int] = field(default_factory=set)
    """Steps reported, then dropped by a rollback (or a resume) of the run: validated again,
    their new value replaces the old one in the study."""
    handle: Any = None
    """The study's `optuna.trial.Trial`: what reports, asks about pruning and is told."""


class Controller:
    """Runs a sweep's trials on this machine, `spec.workers` at a time."""

    def __init__(self, sweep: Sweep, storage: str | None = None) -> None:
        self.sweep = sweep
        self.study = open_study(sweep, storage)
        self.lock = threading.Lock()
        self.writing = threading.Lock()
        self.stopping = False
        self.stopped_by: str | None = None
        """Why the sweep paused before its end: "SIGTERM", "SIGINT", "timeout", "error"."""
        self.deadline: float | None = None
        """time.monotonic() past which no trial starts and the running ones pause."""
        self.errors: list[BaseException] = []
        self.running: dict[int, _Trial] = {}
        self.queue: list[_Trial] = []
        self.voice = _Voice(sweep)
        self.mlflow = None
        if uses_mlflow(sweep):  # the parent run every trial's MLflow run nests under
            self.mlflow = MlflowParent(sweep, self.study)

    def _total(self) -> int:
        spec = self.sweep.spec
        if spec.method == "grid":
            points = 1
            for key in spec.space:
                points *= len(spec.values(key))  # type: ignore[arg-type]
            return min(spec.trials, points)
        return spec.trials

    def _resumable(self) -> list[_Trial]:
        """Trials the study holds as running that no process of this sweep runs: interrupted.
        They continue from their checkpoint (or start again when they wrote none)."""
        optuna = _optuna()
        found = []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number in self.running or _owned_elsewhere(t, self.sweep.trial_dir(t.number)):
                continue
            resume = RunPaths(self.sweep.trial_dir(t.number)).checkpoints.is_dir()
            # A running trial's handle (Optuna has no public lookup by number).
            handle = optuna.trial.Trial(self.study, t._trial_id)
            handle.set_user_attr("controller", _OWNER)
            found.append(_Trial(t.number, dict(t.params), resume=resume, handle=handle))
        return found

    def _next(self) -> _Trial | None:
        """The next trial to run: an interrupted one, else a new candidate while the study has
        fewer than `trials`."""
        with self.lock:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._pause("timeout")
            if self.stopping:
                return None
            if self.queue:
                return self.queue.pop(0)
            if len(self.study.get_trials(deepcopy=False)) >= self._total():
                return None
            trial = self.study.ask(_distributions(self.sweep.spec))
            if trial.number >= self._total():  # another controller took the last one first
                trial.set_user_attr(SURPLUS, True)
                self.study.tell(trial, state=_optuna().trial.TrialState.FAIL)
                return None
            trial.set_user_attr("controller", _OWNER)
            params = {k: trial.params[k] for k in self.sweep.spec.space}
            return _Trial(trial.number, params, handle=trial)

    def _tell(self, t: _Trial, state: str, value: float | None = None, **attrs: Any) -> None:
        optuna = _optuna()
        attrs["controller_rss_mb"] = round(_rss_mb(), 1)  # flat over trials: no torch here
        with self.lock:
            trial = t.handle
            for key, val in attrs.items():
                trial.set_user_attr(key, val)
            # Diverged is infeasible: the samplers (TPE, GP) learn to avoid the region.
            trial.set_constraint("diverged", 1.0 if attrs.get("diverged") else 0.0)
            states = optuna.trial.TrialState
            if state == "complete":
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=states.PRUNED if state == "pruned" else states.FAIL)

    def _follow(self, t: _Trial, tail: MetricsTail) -> None:
        """Report the validations the trial logged since the last look. When its run rewrote
        metrics.jsonl (an anomaly rollback, a resume), the validations the rewrite dropped
        are forgotten: a NaN among them no longer condemns the trial, and their steps,
        validated again, are reported again with the new values."""
        rows, rewritten = tail.read()
        if rewritten:
            history = _val_rows(tail.records)
            kept = {r["step"] for r in history}
            with self.lock:
                t.redo |= t.reported - kept
                t.reported &= kept
                metric = self.sweep.spec.metric
                t.nonfinite = t.nonfinite and any(
                    not _finite(_value(r, metric)) for r in history if r["step"] in t.reported
                )
            rows = history
        self._report(t, _val_rows(rows))

    def _report(self, t: _Trial, rows: list[dict[str, Any]]) -> None:
        """Report validations to the study; ask the trial to stop when the pruner says so."""
        metric, trial = self.sweep.spec.metric, t.handle
        for row in rows:
            value = _value(row, metric)
            if row["step"] in t.reported or not isinstance(value, int | float):
                continue
            with self.lock:
                t.reported.add(row["step"])
                t.nonfinite = t.nonfinite or not _finite(value)
                if not t.nonfinite and row["step"] in t.redo:
                    _report_again(trial, float(value), row["step"])
                elif not t.nonfinite:
                    trial.report(float(value), row["step"])
                warm = len(t.reported) > self.sweep.spec.pruner.warmup_evals
                prune = t.nonfinite or (warm and trial.should_prune())
            if prune and not t.pruned and t.proc is not None and t.proc.poll() is None:
                t.pruned = True
                log.info("sweep: trial %d pruned at step %d", t.number, row["step"])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(t.proc.pid, signal.SIGUSR1)

    def _command(self, t: _Trial) -> list[str]:
        run_dir = self.sweep.trial_dir(t.number)
        cmd = [sys.executable, "-m", "kiln.cli", "-q", "train"]
        if t.resume:
            cmd += ["--resume", str(run_dir)]
        else:
            cmd += [str(self.sweep.dir / "base.yaml"), *self.sweep.overrides(t.params)]
            cmd += [f"output_dir={run_dir}", f"name={self.sweep.name}-{t.number:04d}"]
            cmd += self.sweep.grouping()
            cmd.append("--overwrite")  # a trial started again (it had no checkpoint)
        if self.sweep.spec.trial_nproc > 1:
            cmd += ["--nproc", str(self.sweep.spec.trial_nproc)]
        return cmd

    def _run(self, t: _Trial) -> None:
        run_dir = self.sweep.trial_dir(t.number)
        if not t.resume:
            try:
                self.sweep.check(t.params)
            except ConfigError as err:
                self._tell(t, "fail", error=str(err).splitlines()[0])
                log.warning("sweep: trial %d failed: %s", t.number, str(err).splitlines()[0])
                return
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with (run_dir.parent / f"{run_dir.name}.log").open("a") as out:
            t.proc = subprocess.Popen(self._command(t), stdout=out, stderr=subprocess.STDOUT)
            self.running[t.number] = t
            if self.stopping:  # paused while this one was starting: it pauses too
                self._signal(t, signal.SIGTERM)
            tail = MetricsTail(run_dir)
            while t.proc.poll() is None:
                self._follow(t, tail)
                time.sleep(_POLL_S)
            self._follow(t, tail)
        code = t.proc.returncode
        del self.running[t.number]
        wall = time.monotonic() - start
        value, step = _best(tail.records, self.sweep.spec.metric, self.sweep.spec.mode)
        # Finished without one finite value of the metric (NaN validations): as diverged.
        ended = code == ExitCode.FINISHED
        diverged = code == ExitCode.DIVERGED or t.nonfinite or (ended and value is None)
        if ended and value is not None and not t.nonfinite:
            self._tell(t, "complete", value, best_step=step, wall_s=wall)
            with self.lock:  # two workers finishing at once: one decides the best at a time
                done = len(self.study.get_trials(deepcopy=False))
                if self.voice.trial_done(t.number, value, done) and self.mlflow is not None:
                    self.mlflow.best(value)
        elif diverged or (code == ExitCode.PAUSED and t.pruned):
            self._tell(t, "pruned", diverged=diverged, wall_s=wall)
        elif code == ExitCode.PAUSED or self.stopping:
            log.info("sweep: trial %d paused; kiln sweep again resumes it", t.number)
        else:
            why = f"exit code {code}"
            self._tell(t, "fail", error=_last_error(run_dir) or why, wall_s=wall)
        with self.writing:  # two workers finishing at once would share the temporary files
            write_outputs(self.sweep, self.study)

    def _worker(self) -> None:
        try:
            while (t := self._next()) is not None:
                self._run(t)
        except BaseException as exc:  # raised again by run(), once the others have paused
            self.errors.append(exc)
            self._pause("error")

    @staticmethod
    def _signal(t: _Trial, signum: int) -> None:
        if t.proc is not None and t.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.proc.pid, signum)

    def _pause(self, why: str) -> None:
        """No new trials; the running ones get SIGTERM: they checkpoint and exit 3, and stay
        running in the study, so the next `kiln sweep` resumes them."""
        if not self.stopping:
            self.stopped_by = why
        self.stopping = True
        for t in list(self.running.values()):
            self._signal(t, signal.SIGTERM)

    def _on_signal(self, signum: int, _: Any) -> None:
        self._pause(signal.Signals(signum).name)

    def _finished(self) -> bool:
        """Whether the study holds all its trials, each finished (none left to run)."""
        optuna = _optuna()
        states = optuna.trial.TrialState
        done = (states.COMPLETE, states.PRUNED, states.FAIL)
        trials = self.study.get_trials(deepcopy=False, states=done)
        return len([t for t in trials if not t.user_attrs.get(SURPLUS)]) >= self._total()

    def run(self) -> dict[str, Any]:
        best = _best_trial(self.study)
        self.voice.best = None if best is None else best.value
        spec = self.sweep.spec
        self.voice.send(
            "start",
            f"sweep {self.sweep.name} started: {spec.method} search of "
            f"{spec.metric} over {len(spec.space)} keys, {spec.trials} trials",
            len(self.study.get_trials(deepcopy=False)),
        )
        self.queue = self._resumable()
        if spec.timeout_s is not None:
            self.deadline = time.monotonic() + spec.timeout_s
        if self.queue:
            log.info("sweep: resuming trials %s", [t.number for t in self.queue])
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
            }
        try:
            workers = [
                threading.Thread(target=self._worker, name=f"kiln-sweep-{i}", daemon=True)
                for i in range(self.sweep.spec.workers)
            ]
            for w in workers:
                w.start()
            for w in workers:
                while w.is_alive():
                    w.join(0.5)
                    if self.deadline is not None and time.monotonic() >= self.deadline:
                        self._pause("timeout")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.errors:
            raise self.errors[0]
        write_outputs(self.sweep, self.study, plots=True)
        summary = summarize(self.sweep, self.study)
        counts = ", ".join(f"{n} {state}" for state, n in sorted(summary["trials"].items()))
        best = summary["best"]
        found = f"; best trial {best['number']}, {spec.metric} {best['value']:.6g}" if best else ""
        metrics = {spec.metric: float(best["value"])} if best else {}
        if self.mlflow is not None:
            best_value = best["value"] if best else None
            self.mlflow.end(finished=not self.stopping, best=best_value)
        self.voice.send(
            "end",
            f"sweep {self.sweep.name} ended: {counts}{found}",
            sum(summary["trials"].values()),
            **metrics,
        )
        summary["paused"] = None
        if self.stopped_by is not None and not self._finished():
            summary["paused"] = self.stopped_by
            why = (
                f"{spec.timeout_s:g} s ran out" if self.stopped_by == "timeout" else self.stopped_by
            )
            log.warning(
                "sweep paused (%s): %s; run the same kiln sweep command again to continue",
                why,
                counts or "no trials",
            )
        return summary


def _last_error(run_dir: Path) -> str | None:
    """The last `kiln: error:` line a trial printed."""
    logfile = run_dir.parent / f"{run_dir.name}.log"
    lines = logfile.read_text(errors="replace").splitlines() if logfile.is_file() else []
    errors = [x for x in lines if x.startswith("kiln: error: ")]
    return errors[-1].removeprefix("kiln: error: ") if errors else None


def run(
    path: str | Path, overrides: list[str] | None = None, *, storage: str | None = None
) -> dict[str, Any]:
    """Run (or continue) the sweep of `path`; returns `summarize`'s dict."""
    sweep = load_sweep(path, overrides)
    previous = sweep.dir / "sweep.yaml"
    if previous.is_file():
        try:
            before = yaml.safe_load(previous.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise KilnError(f"{previous}: cannot read it ({first_line(exc)})") from None
        before = before.get("sweep") if isinstance(before, dict) else None
        if (
            not isinstance(before, dict)
            or before.get("space") != sweep.resolved()["sweep"]["space"]
        ):
            raise KilnError(
                f"{sweep.dir}: a sweep of another space ran here; choose another output_dir or name"
            )
    _write_definition(sweep)
    controller = Controller(sweep, storage)
    if SWEEP_ATTR not in controller.study.user_attrs:  # what `kiln sweep agent` joins
        controller.study.set_user_attr(SWEEP_ATTR, sweep.resolved())
    return controller.run()


SWEEP_ATTR = "kiln.sweep"
"""The study's user attribute holding the resolved sweep (base config plus `sweep:`)."""


def _write_definition(sweep: Sweep) -> None:
    """sweep.yaml (the sweep as resolved) and base.yaml (what the trials start from)."""
    try:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sweep.dir / "sweep.yaml", yaml.safe_dump(sweep.resolved(), sort_keys=False))
        write_atomic(sweep.dir / "base.yaml", yaml.safe_dump(sweep.base, sort_keys=False))
    except OSError as exc:
        raise KilnError(f"{sweep.dir}: cannot write the sweep there ({first_line(exc)})") from None


def agent(
    storage: str,
    study: str,
    *,
    workers: int | None = None,
    directory: str | Path | None = None,
    wait_s: float = 60.0,
) -> dict[str, Any]:
    """Join the sweep `study` in `storage` (started by `kiln sweep FILE --storage ...` on any
    machine) and run its trials here, `workers` at a time, until it has all it asked for.

    The trials go to `directory` (default: the sweep's own directory, as on a shared file
    system). The study may not exist yet: the agent waits up to `wait_s` for it."""
    optuna = _optuna()
    from kiln.sweep.study import _permanent, storage_error, storage_of, sweep_from_dict

    deadline, why = time.monotonic() + wait_s, "no such sweep"
    while True:
        raw = None
        try:
            found = optuna.load_study(study_name=study, storage=storage_of(storage))
            raw = found.user_attrs.get(SWEEP_ATTR)
        except KeyError:  # Optuna: no such study (yet)
            pass
        except KilnError:
            raise
        except Exception as exc:  # the database being created by the sweep's first controller
            # No driver, a bad URL: waiting will not help (a server may still be starting).
            if _permanent(exc, server=False):
                raise storage_error(exc, storage, Path(".")) from None
            why = f"cannot read the study ({first_line(exc)})"
        if raw is not None:
            break
        if time.monotonic() > deadline:
            raise KilnError(
                f"--study {study}: {why} in {storage} after {wait_s:.0f}s; "
                "start it with kiln sweep FILE --storage ..."
            )
        time.sleep(0.5)
    where = None if directory is None else Path(directory)
    sweep = sweep_from_dict(raw, f"{storage} (study {study})", where)
    if workers is not None:
        sweep.spec = sweep.spec.model_copy(update={"workers": workers})
    if not (sweep.dir / "base.yaml").is_file():
        _write_definition(sweep)
    log.info("sweep: agent %s joins %s, %d workers", _OWNER, study, sweep.spec.workers)
    return Controller(sweep, storage).run()
