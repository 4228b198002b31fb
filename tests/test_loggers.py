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
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import tiny_config

from kiln import Callback, StopRequest, Trainer
from kiln.callbacks.background import Lane, drain
from kiln.callbacks.defaults import default_callbacks
from kiln.callbacks.loggers import (
    LOGGERS,
    TRACKING_FILE,
    RunContext,
    TrackingCallback,
    flatten,
    metric_items,
    open_logger,
)
from kiln.callbacks.plotting import PlotsCallback
from kiln.config import ConfigError
from kiln.config.tracking import LogConfig
from kiln.engine.control import Control, RunView
from kiln.engine.state import TrainState
from kiln.errors import KilnError
from kiln.rank import RankContext
from kiln.registry import UnknownName

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
            if key == "epoch" and r["split"] == "val":  # train/epoch has it
                continue
            name = key[4:] if r["split"] == "val" and key.startswith("val_") else key
            out.setdefault(f"{r['split']}/{name}", {})[r["step"]] = float(value)
    return out


def test_metric_items_names_and_flatten() -> None:
    train = {"step": 5, "split": "train", "loss": 2.5, "lr": 1e-3, "epoch": 0, "note": "x"}
    val = {"step": 5, "split": "val", "epoch": 0, "val_loss": 2.0, "val_ppl": 7.39, "loss": 2.0}
    assert metric_items(train) == {"train/loss": 2.5, "train/lr": 1e-3, "train/epoch": 0.0}
    assert metric_items(val) == {"val/loss": 2.0, "val/ppl": 7.39}
    flat = flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "name": "r", "x": None})
    assert flat == {"optim.lr": 0.1, "optim.betas": "[0.9, 0.99]", "name": "r", "x": "null"}


class _PauseAt(Callback):
    """Stops for good at a step: the first part of a run that is resumed later."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, run: RunView) -> None:
        if run.state.step == self.step:
            run.control.request_stop(StopRequest("requested", "paused by test", resumable=True))


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    EventAccumulator = accumulator.EventAccumulator

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
    MlflowClient = pytest.importorskip("mlflow").MlflowClient

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
    Trainer.from_config(cfg, callbacks=[_PauseAt(12)]).fit()
    ids = json.loads((run / TRACKING_FILE).read_text())
    assert (run / "checkpoints" / "step-10").is_dir()
    result = Trainer.from_config(cfg, resume=run / "checkpoints" / "step-10").fit()
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
Trainer.from_config(cfg).fit()
first = json.loads((cfg.run_dir / "tracking.json").read_text())
time.sleep(1.1)  # W&B names offline run directories by the second they start
Trainer.from_config(cfg, resume=cfg.run_dir / "checkpoints" / "step-5").fit()
second = json.loads((cfg.run_dir / "tracking.json").read_text())
print(json.dumps({{"first": first, "second": second}}))
"""


def _wandb_records(path: Path) -> list[Any]:
    """Records of a .wandb file (LevelDB-log framing of W&B's protobuf `Record`s)."""
    wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

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
            want = {
                **metric_items(_record(records, h["_step"], "train")),
                **metric_items(_record(records, h["_step"], "val")),
            }
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


@pytest.fixture
def register() -> Iterator[Callable[[str, Any], None]]:
    """Register trackers by name, as a user would (removed after the test)."""
    added: list[str] = []

    def add(name: str, factory: Any) -> None:
        LOGGERS.add(name, factory)
        added.append(name)

    yield add
    for name in added:
        LOGGERS.pop(name)


def _fake(register: Callable[[str, Any], None], logger: _Recorder) -> TrackingCallback:
    """A TrackingCallback of one registered tracker, "fake", that is `logger`."""
    register("fake", lambda cfg, ctx: logger)
    return TrackingCallback(LogConfig(), loggers=["fake"])


def test_calls_run_off_the_training_thread_and_artifacts_arrive(
    tmp_path: Path, recipe_files, register: Callable[[str, Any], None]
) -> None:
    fake = _Recorder()
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 10}, log={"plots": True})
    # The plots first, so the tracker can attach them.
    Trainer(cfg, callbacks=[PlotsCallback(), _fake(register, fake)]).fit()
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
    assert json.loads((cfg.run_dir / TRACKING_FILE).read_text()) == {"fake": "fake-1"}


def test_failing_backend_is_switched_off_with_one_warning(
    tmp_path: Path,
    recipe_files,
    register: Callable[[str, Any], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = _Recorder(fail_on=2)  # params, metrics@5, metrics@10 raises
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 10}, log={"plots": False})
    callback = _fake(register, fake)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = Trainer(cfg, callbacks=[callback]).fit()
    assert result.final_dir is not None
    assert result.summary["steps"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "log.loggers: fake failed (ConnectionError: tracker went away); "
        "it is off for the rest of the run"
    ]
    # Nothing after the failure but the best-effort close.
    assert fake.calls[-1] == ("close", "failed")
    assert [c[0] for c in fake.calls] == ["params", "metrics", "metrics", "close"]
    assert callback.active == []


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
        result = Trainer.from_config(cfg).fit()
    assert result.final_dir is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("log.loggers: mlflow failed")
    assert "train/loss" in _tensorboard_scalars(cfg.run_dir / "tensorboard")


def test_stuck_backend_never_holds_up_the_run(
    tmp_path: Path,
    recipe_files,
    register: Callable[[str, Any], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    fake = _Recorder(block=release)
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 5}, log={"plots": False})
    register("fake", lambda cfg, ctx: fake)
    callback = TrackingCallback(LogConfig(close_timeout_s=0.5), loggers=["fake"])
    try:
        with caplog.at_level(logging.WARNING, logger="kiln"):
            result = Trainer(cfg, callbacks=[callback]).fit()
    finally:
        release.set()
    assert result.summary["steps"] == 5
    assert [c[0] for c in fake.calls] == ["params", "metrics"]  # stuck in the first metrics call
    assert [r.getMessage() for r in caplog.records] == [
        "log.loggers: fake: still busy after 0.5 s (log.close_timeout_s); not waiting for it"
    ]


def _view(tmp_path: Path, stop: StopRequest | None = None) -> RunView:
    """A run's view as the loop hands it to callbacks, after a stop request (or none)."""
    control = Control()
    if stop is not None:
        control.request_stop(stop)
    cfg: Any = SimpleNamespace(name="t", model_dump=lambda mode: {"optim": {"lr": 0.1}})
    return RunView(cfg, TrainState(step=7, total_steps=20), tmp_path, control, RankContext())


@pytest.mark.parametrize(
    ("stop", "final", "status"),
    [
        (None, True, "finished"),
        (StopRequest("early_stop", "no better for 3 validations"), True, "finished"),
        (StopRequest("signal", "SIGTERM", resumable=True), False, "paused"),
        (StopRequest("pruned", "trial pruned", resumable=True, write_final=False), False, "paused"),
        (StopRequest("pruned", "trial pruned", write_final=False), False, "stopped"),
        (StopRequest("diverged", "loss is nan", write_final=False), False, "diverged"),
    ],
)
def test_the_tracker_run_ends_with_the_status_of_the_stop(
    tmp_path: Path,
    register: Callable[[str, Any], None],
    stop: StopRequest | None,
    final: bool,
    status: str,
) -> None:
    fake = _Recorder()
    callback = _fake(register, fake)
    run = _view(tmp_path, stop)
    callback.on_train_begin(run)
    callback.on_log(run, {"step": 7, "split": "train", "loss": 1.5})
    if final:
        callback.on_checkpoint(run, tmp_path / "final", "final")
    callback.on_checkpoint(run, tmp_path / "checkpoints" / "step-7", "pause")  # not a model
    callback.on_train_end(run)
    assert fake.calls[0] == ("params", {"optim.lr": 0.1})
    assert fake.calls[1] == ("metrics", 7)
    models = [c for c in fake.calls if c[0] == "artifact" and c[1][1] == "model"]
    assert models == ([("artifact", ("final", "model"))] if final else [])
    assert fake.calls[-1] == ("close", status)
    # The callback serves another fit(): nothing of the first one carries over.
    again = _Recorder()
    LOGGERS.add("fake", lambda cfg, ctx: again, replace=True)
    callback.on_train_begin(_view(tmp_path))
    callback.on_exception(_view(tmp_path), RuntimeError("x"))
    assert [c[0] for c in again.calls] == ["params", "close"]
    assert again.calls[-1] == ("close", "failed")


def test_trackers_are_plug_ins_by_name(
    tmp_path: Path, register: Callable[[str, Any], None]
) -> None:
    class MyLogger(_Recorder):
        def __init__(self, cfg: Any, ctx: Any) -> None:
            super().__init__()
            self.ctx = ctx

    register("mine", MyLogger)  # a Logger class is its own factory
    logger = open_logger("mine", LogConfig(), _ctx(tmp_path))
    assert isinstance(logger, MyLogger)
    assert logger.ctx.run_dir == tmp_path
    # By import path too, without registering.
    assert isinstance(
        open_logger(f"{__name__}:_Importable", LogConfig(), _ctx(tmp_path)), _Recorder
    )
    with pytest.raises(UnknownName, match=r"unknown logger 'neptune' \(known: .*mine.*wandb\)"):
        open_logger("neptune", LogConfig(), _ctx(tmp_path))
    with pytest.raises(KilnError) as info:
        TrackingCallback(LogConfig(), loggers=["tensorboard", "neptune", "nowhere:X"])
    assert [p.split(" (")[0] for p in info.value.problems] == [
        "log.loggers: unknown logger 'neptune'",
        "log.loggers: cannot import logger 'nowhere:X': No module named 'nowhere'",
    ]


class _Importable(_Recorder):
    def __init__(self, cfg: Any, ctx: Any) -> None:
        super().__init__()


def _ctx(run_dir: Path) -> RunContext:
    return RunContext(run_dir=run_dir, name="t", step=0, resumed=False)


def test_lanes_drain_in_parallel_against_one_deadline(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    stuck = [Lane("log.loggers", f"slow{i}") for i in range(3)]
    done: list[str] = []
    quick = Lane("log.loggers", "quick")
    for lane in stuck:
        lane.submit(release.wait, 30)
        lane.submit(done.append, lane.name)  # queued behind the stuck call: dropped
    quick.submit(done.append, "quick")
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="kiln"):
            busy = drain([*stuck, quick], 0.3, "log.close_timeout_s")
        took = time.monotonic() - start
    finally:
        release.set()
    assert busy == stuck
    assert 0.25 < took < 1.0, took  # one deadline for all, not 0.3 s each
    assert [r.getMessage() for r in caplog.records] == [
        "log.loggers: slow0, slow1, slow2: still busy after 0.3 s (log.close_timeout_s); "
        "not waiting for them"
    ]
    for lane in stuck:
        lane.worker.join(5)
    assert done == ["quick"]  # the abandoned lanes dropped what was still queued
    quick.submit(done.append, "late")  # a drained lane takes no more calls
    assert done == ["quick"]


def test_missing_extra_is_an_error_naming_it(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: it cannot be found
    cfg = tiny_config(tmp_path, *recipe_files, log={"loggers": ["tensorboard", "wandb"]})
    with pytest.raises(KilnError) as info:
        default_callbacks(cfg)
    (problem,) = info.value.problems
    assert problem.startswith("log.loggers: wandb needs wandb (")
    assert problem.endswith("install it with: pip install 'kiln[wandb]'")
    with pytest.raises(KilnError, match=r"pip install 'kiln\[wandb\]'"):
        Trainer.from_config(cfg)  # before any data is prepared
    assert not cfg.run_dir.exists()


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
