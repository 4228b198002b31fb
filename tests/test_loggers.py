"""Trackers: TensorBoard, MLflow and W&B runs read back with each library's own reader, resume
continues the same tracker run, and a failing or stuck backend never stops training."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_config

from kiln import Callback, Trainer
from kiln.callbacks.loggers import TRACKING_FILE, flatten, metric_items, tracking_callbacks
from kiln.config import ConfigError
from kiln.errors import KilnError

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_scalars(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, written out independently of `metric_items`."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("step", "split") or isinstance(value, bool | str):
                continue
            name = key[4:] if r["split"] == "val" and key.startswith("val_") else key
            out.setdefault(f"{r['split']}/{name}", {})[r["step"]] = float(value)
    return out


def test_metric_items_names_and_flatten() -> None:
    train = {"step": 5, "split": "train", "loss": 2.5, "lr": 1e-3, "epoch": 0, "note": "x"}
    val = {"step": 5, "split": "val", "val_loss": 2.0, "val_ppl": 7.39, "loss": 2.0}
    assert metric_items(train) == {"train/loss": 2.5, "train/lr": 1e-3, "train/epoch": 0.0}
    assert metric_items(val) == {"val/loss": 2.0, "val/ppl": 7.39}
    flat = flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "name": "r", "x": None})
    assert flat == {"optim.lr": 0.1, "optim.betas": "[0.9, 0.99]", "name": "r", "x": "null"}


class _PauseAt(Callback):
    """Stops for good at a step: the first part of a run that is resumed later."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            trainer.request_stop("paused by test", resumable=True)


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_metrics_and_resume_continues_them(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        eval={"every_steps": 5},
        checkpoint={"every_steps": 10},
        log={"loggers": ["tensorboard", "mlflow"], "close_timeout_s": 60, "plots": True},
    )
    run = cfg.run_dir
    # Part one pauses at step 12 (checkpoint 12, metrics logged to 10); part two resumes from
    # the step-10 checkpoint, so steps 11-12 are logged again (and must not appear twice).
    Trainer(cfg, callbacks=[_PauseAt(12)]).fit()
    ids = json.loads((run / TRACKING_FILE).read_text())
    assert (run / "checkpoints" / "step-10").is_dir()
    result = Trainer(cfg, resume=run / "checkpoints" / "step-10").fit()
    assert result.final_dir is not None
    assert json.loads((run / TRACKING_FILE).read_text()) == ids

    records = read_jsonl(run / "metrics.jsonl")
    expected = expected_scalars(records)
    assert {"train/loss", "train/lr", "val/loss", "val/ppl", "val/accuracy"} <= set(expected)

    # TensorBoard, read with its own reader: every scalar of metrics.jsonl, each step once.
    scalars = _tensorboard_scalars(run / "tensorboard")
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert scalars[tag] == pytest.approx(by_step, rel=1e-6), tag

    # MLflow, read with its own client: one run (resumed, not duplicated), params, metrics.
    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("kiln")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["optim.lr"] == "0.003"
    assert params["train.max_steps"] == "20"
    assert params["model.arch"] == "gpt2"
    assert len(params) == len(flatten(cfg.model_dump(mode="json")))
    for tag, by_step in expected.items():
        history = client.get_metric_history(ids["mlflow"], tag)
        got: dict[int, float] = {}
        for m in history:
            got[m.step] = m.value  # a re-logged step (11-12 after resume) keeps the newest value
        assert got == pytest.approx(by_step, rel=1e-6), tag
    assert mlrun.data.tags["final_model"] == str(run / "final")
    plots = {Path(a.path).name for a in client.list_artifacts(ids["mlflow"], "plots")}
    assert {"loss.png", "lr.png", "val_accuracy.png"} <= plots
    assert (run / "mlflow-artifacts").is_dir()  # beside the store, not ./mlruns of the cwd


_WANDB_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import tiny_config
from kiln import Trainer

tmp = Path({tmp!r})
cfg = tiny_config(tmp, Path({train!r}), Path({val!r}), train={{"max_steps": 10}},
                  eval={{"every_steps": 5}}, checkpoint={{"every_steps": 5}},
                  log={{"loggers": ["wandb"], "wandb": {{"project": "kiln-test"}},
                       "plots": False, "close_timeout_s": 60}})
Trainer(cfg).fit()
first = json.loads((cfg.run_dir / "tracking.json").read_text())
time.sleep(1.1)  # W&B names offline run directories by the second they start
Trainer(cfg, resume=cfg.run_dir / "checkpoints" / "step-5").fit()
second = json.loads((cfg.run_dir / "tracking.json").read_text())
print(json.dumps({{"first": first, "second": second}}))
"""


def _wandb_records(path: Path) -> list[Any]:
    """Records of a .wandb file (LevelDB-log framing of W&B's protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, block, buf, records = 7, 32768, b"", []  # 7: the W&B file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block trailer too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_is_created_and_resumed_under_the_same_id(
    tmp_path: Path, recipe_files
) -> None:
    train, val = recipe_files
    script = _WANDB_SCRIPT.format(
        tests=str(ROOT / "tests"), tmp=str(tmp_path), train=str(train), val=str(val)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_BASE_URL="http://127.0.0.1:9",  # would fail fast if anything tried the network
    )
    # A subprocess with a deadline: W&B starts a service process, and a hang must fail the
    # test instead of stalling the suite.
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    run_id = ids["first"]["wandb"]
    assert ids["second"]["wandb"] == run_id

    run = tmp_path / "run"
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in dirs] == [run_id, run_id]
    records = read_jsonl(run / "metrics.jsonl")
    for part, (d, steps) in enumerate(zip(dirs, ([5, 10], [10]), strict=True)):
        recs = _wandb_records(d / f"run-{run_id}.wandb")
        assert next(r.run.run_id for r in recs if r.WhichOneof("record_type") == "run") == run_id
        history = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in recs
            if r.WhichOneof("record_type") == "history"
        ]
        assert sorted({h["_step"] for h in history}) == steps, part
        # metrics.jsonl keeps part one's records up to the checkpoint (5), then part two's.
        for h in (h for h in history if part == 1 or h["_step"] <= 5):
            want = {**metric_items(_record(records, h["_step"], "train")),
                    **metric_items(_record(records, h["_step"], "val"))}  # fmt: skip
            got = {k: v for k, v in h.items() if not k.startswith("_")}
            assert got == pytest.approx(want, rel=1e-6)
        config_json = [r for r in recs if r.WhichOneof("record_type") == "config"]
        if part == 0:
            keys = {u.key for r in config_json for u in r.config.update}
            assert {"optim.lr", "train.max_steps"} <= keys


def _record(records: list[dict[str, Any]], step: int, split: str) -> dict[str, Any]:
    return next(r for r in records if r["step"] == step and r["split"] == split)


class _Recorder:
    """A Logger that records calls and the threads they ran on; optionally fails or blocks."""

    def __init__(self, fail_on: int | None = None, block: threading.Event | None = None) -> None:
        self.name = "fake"
        self.run_id = "fake-1"
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[int] = set()
        self.fail_on = fail_on
        self.block = block

    def _seen(self, what: str, arg: Any) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append((what, arg))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._seen("params", dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._seen("metrics", step)
        if self.block is not None:
            self.block.wait(30)
        if self.fail_on is not None and len(self.calls) - 1 == self.fail_on:
            raise ConnectionError("tracker went away")

    def log_artifact(self, path: Path, kind: str) -> None:
        self._seen("artifact", (path.name, kind))

    def close(self, status: str) -> None:
        self._seen("close", status)


def _fake_backend(monkeypatch: pytest.MonkeyPatch, logger: _Recorder) -> None:
    import kiln.callbacks.loggers.callback as callback

    monkeypatch.setattr(callback, "open_logger", lambda name, cfg, ctx: logger)
    monkeypatch.setattr(callback, "check_installed", lambda names: None)


def test_calls_run_off_the_training_thread_and_artifacts_arrive(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _Recorder()
    _fake_backend(monkeypatch, fake)
    cfg = tiny_config(
        tmp_path, *recipe_files, train={"max_steps": 10}, log={"loggers": ["wandb"], "plots": True}
    )
    Trainer(cfg).fit()
    assert threading.get_ident() not in fake.threads
    assert len(fake.threads) == 1  # one thread per backend: calls stay in order
    kinds = [c[0] for c in fake.calls]
    assert kinds[0] == "params"
    assert kinds[-1] == "close"
    assert fake.calls[-1] == ("close", "finished")
    steps = [c[1] for c in fake.calls if c[0] == "metrics"]
    assert steps == [r["step"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")]
    artifacts = [c[1] for c in fake.calls if c[0] == "artifact"]
    assert ("final", "model") in artifacts
    assert ("loss.png", "plot") in artifacts
    assert ("summary.json", "file") in artifacts


def test_failing_backend_is_switched_off_with_one_warning(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _Recorder(fail_on=2)  # params, metrics@5, metrics@10 raises
    _fake_backend(monkeypatch, fake)
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 10},
        log={"loggers": ["mlflow"], "plots": False},
    )
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = Trainer(cfg).fit()
    assert result.final_dir is not None
    assert result.summary["steps"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "log.loggers: mlflow failed (ConnectionError: tracker went away); "
        "it is off for the rest of the run"
    ]
    # Nothing after the failure but the best-effort close.
    assert fake.calls[-1] == ("close", "failed")
    assert [c[0] for c in fake.calls] == ["params", "metrics", "metrics", "close"]


def test_unreachable_backend_does_not_stop_training(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real MLflow store that cannot be opened: one warning, TensorBoard goes on."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        log={
            "loggers": ["mlflow", "tensorboard"],
            "mlflow": {"tracking_uri": f"sqlite:///{blocker}/sub/mlflow.db"},
            "plots": False,
        },
        train={"max_steps": 5},
    )
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = Trainer(cfg).fit()
    assert result.final_dir is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("log.loggers: mlflow failed")
    assert "train/loss" in _tensorboard_scalars(cfg.run_dir / "tensorboard")


def test_stuck_backend_never_holds_up_the_run(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    fake = _Recorder(block=release)
    _fake_backend(monkeypatch, fake)
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 5},
        log={"loggers": ["mlflow"], "plots": False, "close_timeout_s": 0.5},
    )
    try:
        with caplog.at_level(logging.WARNING, logger="kiln"):
            result = Trainer(cfg).fit()
    finally:
        release.set()
    assert result.summary["steps"] == 5
    assert [c[0] for c in fake.calls] == ["params", "metrics"]  # stuck in the first metrics call
    assert any("still busy" in r.getMessage() for r in caplog.records)


def test_missing_extra_is_an_error_naming_it(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    import kiln.callbacks.loggers.callback as callback

    real = importlib.util.find_spec
    monkeypatch.setattr(
        callback.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    cfg = tiny_config(tmp_path, *recipe_files, log={"loggers": ["tensorboard", "wandb"]})
    with pytest.raises(
        KilnError, match=r"log.loggers: wandb is not installed: pip install 'kiln\[wandb\]'"
    ):
        tracking_callbacks(cfg)
    with pytest.raises(KilnError, match="kiln"):
        Trainer(cfg)  # before any data is prepared


def test_logger_config_errors_name_their_key(tmp_path: Path, recipe_files) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *recipe_files, log={"loggers": ["mlflow", "mlflow"]})
    assert info.value.problems == ["log.loggers: lists a logger twice"]
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *recipe_files, log={"loggers": ["neptune"]})
    assert info.value.problems[0].startswith("log.loggers.0: input should be 'tensorboard'")
    with pytest.raises(ConfigError) as info:
        tiny_config(
            tmp_path, *recipe_files, log={"mlflow": {"tracking_uri": "https://u:hunter2@ml.x"}}
        )
    (problem,) = info.value.problems
    assert problem.startswith("log.mlflow.tracking_uri: holds a password")
    assert "hunter2" not in problem
