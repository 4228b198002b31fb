"""`kiln sweep`: trials are kiln runs; pruning, failures, grid, resume after a kill, storages."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_rows, tiny_raw, write_jsonl

from kiln.config import load_config

pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp: Path, name: str, sweep: dict[str, Any], **sections: Any) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(80, seed=3))
        write_jsonl(tmp / "val.jsonl", make_rows(12, seed=4))
    defaults: dict[str, Any] = {
        "train": {"max_steps": 6, "num_threads": 1},
        "eval": {"every_steps": 2},
        "checkpoint": {"every_steps": 2, "every_minutes": None},
        "log": {"every_steps": 2, "plots": False},
    }
    raw = tiny_raw(tmp, data, tmp / "val.jsonl", **{**defaults, **sections})
    raw["name"], raw["output_dir"] = name, str(tmp / name)
    raw["data"]["cache_dir"] = str(tmp / "cache")
    raw["sweep"] = sweep
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _kiln(*args: str, **popen: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kiln.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _trials(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def _final_val(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["final_val"]["val_loss"]


@pytest.fixture(scope="module")
def tpe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tpe")
    space = {"optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "train.batch_size": [2, 4]}
    path = _sweep_file(
        tmp,
        "tpe",
        {"method": "tpe", "trials": 6, "workers": 2, "space": space, "pruner": {"type": "none"}},
    )
    done = _kiln("sweep", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return path, tmp / "tpe"


def test_trials_are_runs_of_the_base_config_plus_their_values(tpe) -> None:
    _, sweep_dir = tpe
    rows = _trials(sweep_dir)
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2, 3, 4, 5]
    assert {r["state"] for r in rows} == {"complete"}
    base = yaml.safe_load((sweep_dir / "base.yaml").read_text())
    for row in rows:
        run = Path(row["run_dir"])
        assert run == sweep_dir / "trials" / f"{int(row['number']):04d}"
        lr, batch = float(row["params.optim.lr"]), int(row["params.train.batch_size"])
        want = load_config(
            data=base,
            overrides=[
                f"optim.lr={lr!r}",
                f"train.batch_size={batch}",
                f"output_dir={run}",
                f"name=tpe-{int(row['number']):04d}",
            ],
        )
        got = load_config(run / "config.yaml")
        assert got == want
        assert float(row["value"]) == min(
            json.loads(x)["val_loss"]
            for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "val"
        )
    report = (sweep_dir / "report.md").read_text()
    assert "| trial | state | val_loss |" in report
    # The plots, drawn by Optuna when the sweep ended: each a real PNG, linked from report.md.
    for name, title in [
        ("history", "Optimization history"),
        ("parallel", "Parallel coordinates"),
        ("importance", "Parameter importance"),
        ("intermediate", "Validations per trial"),
    ]:
        assert f"## {title}\n\n![{title}](plots/{name}.png)" in report
        png = (sweep_dir / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert len(png) > 5000


def test_best_yaml_reproduces_the_best_trial_exactly(tpe) -> None:
    _, sweep_dir = tpe
    best = min(_trials(sweep_dir), key=lambda r: float(r["value"]))
    done = _kiln("-q", "train", str(sweep_dir / "best.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _final_val(sweep_dir / "best") == _final_val(Path(best["run_dir"]))
    status = _kiln("sweep", "status", str(sweep_dir))
    assert status.stdout.startswith("sweep tpe (")
    assert f"best: trial {best['number']}, val_loss" in status.stdout


def test_grid_runs_each_point_once_and_fails_or_prunes_bad_ones(tmp_path: Path) -> None:
    space = {"optim.lr": [1e6, 3e-3], "train.batch_size": [0, 4]}
    path = _sweep_file(
        tmp_path, "grid", {"method": "grid", "trials": 10, "workers": 2, "space": space}
    )
    done = _kiln("sweep", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        (float(r["params.optim.lr"]), int(r["params.train.batch_size"])): r
        for r in _trials(tmp_path / "grid")
    }
    assert len(rows) == 4  # every point once, though 10 trials were allowed
    for lr in (1e6, 3e-3):  # batch size 0: the one-line config error, not retried
        assert rows[lr, 0]["state"] == "fail"
        assert rows[lr, 0]["error"].startswith("train.batch_size: input should be greater than 0")
        assert not Path(rows[lr, 0]["run_dir"]).exists()
    # lr 1e6 diverges (exit 4, or NaN validations): pruned and marked infeasible.
    diverged = Path(rows[1e6, 4]["run_dir"])
    assert rows[1e6, 4]["state"] == "pruned"
    metrics = [json.loads(x) for x in (diverged / "metrics.jsonl").read_text().splitlines()]
    status = json.loads((diverged / "status.json").read_text())["state"]
    assert status == "diverged" or all(  # NaN, written as null
        r["val_loss"] is None or r["val_loss"] != r["val_loss"]
        for r in metrics
        if r["split"] == "val"
    )
    assert (diverged / "checkpoints").is_dir()
    assert rows[3e-3, 4]["state"] == "complete"


def test_a_space_key_that_is_not_a_config_key_fails_before_any_trial(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, "bad", {"space": {"train.batchsize": [2, 4]}})
    done = _kiln("sweep", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "sweep.space.train.batchsize: not a config key; did you mean train.batch_size?"
    )
    assert not (tmp_path / "bad" / "trials").exists()
    done = _kiln("train", str(path))  # a sweep file is not a run config
    assert done.returncode == 2
    assert "run it with kiln sweep FILE" in done.stderr


def test_what_the_base_names_is_checked_before_any_trial(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, "missing", {"space": {"optim.lr": [1e-3, 2e-3]}})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["train"] = str(tmp_path / "gone.jsonl")
    raw["model"] = {"name_or_path": str(tmp_path / "no-model")}
    path.write_text(yaml.safe_dump(raw))
    done = _kiln("sweep", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].endswith(f"data.train: {tmp_path / 'gone.jsonl'}: no such file")
    assert "model.name_or_path: " in lines[1]
    assert "no such directory" in lines[1]
    assert not (tmp_path / "missing" / "trials").exists()


def test_killed_sweep_resumes_its_interrupted_trial(tmp_path: Path) -> None:
    space = {"optim.lr": [2e-3, 4e-3]}
    path = _sweep_file(
        tmp_path,
        "killed",
        {"method": "grid", "trials": 2, "workers": 1, "space": space},
        train={"max_steps": 12, "num_threads": 1},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "sweep", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = tmp_path / "killed" / "trials" / "0000" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (first / "step-4").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (first / "step-4").is_dir()
    os.killpg(proc.pid, signal.SIGKILL)  # the controller and its trial, at once
    proc.wait()
    # A clean run of trial 0's parameters, beside the sweep continued (two trials at once).
    clean = yaml.safe_load((tmp_path / "killed" / "trials" / "0000" / "config.yaml").read_text())
    clean["output_dir"] = str(tmp_path / "clean")
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    clean_run = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "-q", "train", str(tmp_path / "clean.yaml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    done = _kiln("sweep", str(path), "sweep.workers=2")
    assert clean_run.wait(timeout=300) == 0, clean_run.stderr.read()[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _trials(tmp_path / "killed")
    assert sorted(r["number"] for r in rows) == ["0", "1"]
    assert {r["state"] for r in rows} == {"complete"}
    status = json.loads((tmp_path / "killed" / "trials" / "0000" / "summary.json").read_text())
    assert status["resumed_from"] is not None  # continued from its checkpoint, not restarted
    # Its result equals the clean run of the same parameters.
    trial = tmp_path / "killed" / "trials" / "0000"
    assert _final_val(trial) == _final_val(tmp_path / "clean")


def test_two_controllers_on_a_fresh_database_run_every_trial_once(
    tmp_path: Path, database_url: str
) -> None:
    # Started at the same moment on a fresh database: both create the study, both finish.
    url = database_url
    storage = "postgresql" if url.startswith("postgresql") else "sqlite"
    trials = 3 if storage == "postgresql" else 2  # one per process
    sweep = {
        "method": "random",
        "trials": trials,
        "workers": 1,
        "pruner": {"type": "none"},
        "space": {"optim.lr": {"low": 1e-3, "high": 1e-2}},
    }
    path = _sweep_file(tmp_path, "shared", sweep)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kiln.cli", "sweep", str(path), "--storage", url]
    cmds = [cmd, cmd]
    if storage == "postgresql":  # the sweep, and two agents that join it by its study's name
        agent = [
            sys.executable,
            "-m",
            "kiln.cli",
            "sweep",
            "agent",
            "--storage",
            url,
            "--study",
            "shared",
        ]
        cmds = [agent, cmd, agent]
    procs = [
        subprocess.Popen(
            c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in cmds
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(cmds), [o[1][-2000:] for o in outs]
    rows = _trials(tmp_path / "shared")
    assert sorted(int(r["number"]) for r in rows) == list(range(trials))
    assert {r["state"] for r in rows} == {"complete"}
    for row in rows:  # each ran once, by one controller, from the start
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["resumed_from"] is None


def test_one_voice_and_one_mlflow_parent_run_for_the_sweep(tmp_path: Path) -> None:
    """Notifications and the MLflow parent run belong to the sweep; the trials send none and
    their MLflow runs nest under the parent, in the sweep's one store."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    bodies: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            """No per-request lines in the test output."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        sweep = {"method": "grid", "trials": 2, "workers": 2, "space": {"optim.lr": [2e-3, 4e-3]}}
        notify = {"senders": [{"kind": "webhook"}], "events": ["start", "best", "end"]}
        log = {"every_steps": 2, "plots": False, "loggers": ["mlflow"]}
        path = _sweep_file(tmp_path, "voice", sweep, notify=notify, log=log)
        os.environ["KILN_WEBHOOK_URL"] = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        try:
            done = _kiln("sweep", str(path))
        finally:
            del os.environ["KILN_WEBHOOK_URL"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.returncode == 0, done.stderr[-2000:]
    events = [b["event"] for b in bodies]
    assert events[0] == "start"
    assert events[-1] == "end"
    assert set(events[1:-1]) == {"best"}
    assert 1 <= len(events[1:-1]) <= 2
    assert {b["run"] for b in bodies} == {"voice"}  # the sweep's voice, no trial's
    best = min(_trials(tmp_path / "voice"), key=lambda r: float(r["value"]))
    assert bodies[-1]["metrics"]["val_loss"] == float(best["value"])
    trial = load_config(Path(best["run_dir"]) / "config.yaml")
    assert trial.notify.senders == []
    _assert_nested_in_mlflow(tmp_path / "voice")


def _assert_nested_in_mlflow(sweep_dir: Path) -> None:
    MlflowClient = pytest.importorskip("mlflow").MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("kiln").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert (parent.info.run_name, parent.info.status) == (sweep_dir.name, "FINISHED")
    assert parent.data.params["sweep.method"] == '"grid"'
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = [f"{sweep_dir.name}-0000", f"{sweep_dir.name}-0001"]
    assert sorted(r.info.run_name for r in children) == names
    assert {r.info.status for r in children} == {"FINISHED"}
    best = min(float(r["value"]) for r in _trials(sweep_dir))
    history = client.get_metric_history(parent.info.run_id, "best_val_loss")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert values == sorted(values, reverse=True)  # each a new best: falling
    assert values[-1] == best
    for child in children:  # the trial's own metrics, in the one store of the sweep
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert steps == [2, 4, 6]
    assert not list(sweep_dir.glob("trials/*/mlflow.db"))


def test_an_agent_without_its_study_says_so_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    done = _kiln("sweep", "agent", "--storage", url, "--study", "nope", "--wait", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"kiln: error: --study nope: no such sweep in {url} after 0s; start it with kiln sweep "
        "FILE --storage ..."
    ]
    done = _kiln("sweep", "agent", "--study", "nope")
    assert done.returncode == 2
    assert "--storage URL --study NAME: both are needed" in done.stderr
