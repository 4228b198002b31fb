"""`kiln train` as a hostile user meets it (issue 26, items 19-21): bad data under `--nproc 2`
is one line, not one per rank plus torchrun's traceback; SIGTERM at any moment of the start is
kiln's one line and the documented code; a diverging run writes strict JSON (null, never NaN)."""

from __future__ import annotations

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
from helpers import ROOT, gloo_env, make_rows, tiny_raw, tree_hashes, write_jsonl

from kiln.cli import main
from kiln.runs import read_metrics, read_status


def _strict(text: str) -> Any:
    """`text` parsed as JSON that has no NaN/Infinity (which `json.loads` accepts)."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _config(tmp: Path, **sections: Any) -> Path:
    data = write_jsonl(tmp / "train.jsonl", make_rows(40))
    write_jsonl(tmp / "val.jsonl", make_rows(8, seed=1))
    raw = tiny_raw(tmp, data, tmp / "val.jsonl", **sections)
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "-q", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or {**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _kiln_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ---- 19: one line under --nproc ----------------------------------------------------------------


@pytest.mark.slow
def test_item19_bad_data_under_nproc_2_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _config(tmp_path, train={"max_steps": 4})
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write("{not json\n")  # line 41
    proc = _kiln("train", str(config), "--nproc", "2", env=gloo_env())
    _, err = proc.communicate(timeout=240)
    lines = _kiln_lines(err)
    assert proc.returncode == 2, err
    assert len(lines) == 1, err  # once, not once per rank; no torchrun log, no traceback
    assert lines[0].startswith("kiln: error: ")
    assert "train.jsonl:41: invalid JSON" in lines[0]


# ---- 20: SIGTERM during the start --------------------------------------------------------------


def _handles_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _sigterm_after(args: list[str], delay: float) -> tuple[int, list[str]]:
    """Start `kiln -q ARGS`, SIGTERM it `delay` seconds after it can hear one; (code, lines).
    It must hear one before torch is loaded: the start is mostly importing torch."""
    proc = _kiln(*args)
    deadline = time.monotonic() + 60
    while not _handles_sigterm(proc.pid):  # the CLI installs its handler first thing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    assert not loaded, "the handler came after torch was loaded"
    time.sleep(delay)  # the moment under test (importing torch, building the data, ...)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, _kiln_lines(err)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0])
def test_item20_sigterm_while_starting_is_one_line_exit_143(tmp_path: Path, delay: float) -> None:
    config = _config(tmp_path, train={"max_steps": 5000})
    code, lines = _sigterm_after(["train", str(config)], delay)
    assert code == 143, lines
    assert lines == [
        "kiln: stopped by SIGTERM before training started; nothing to resume (start it again)"
    ]
    status = read_status(tmp_path / "run")
    assert status is None or status["exit_code"] == 143, status


@pytest.mark.slow
def test_item20_sigterm_while_resuming_starts_is_exit_3_and_the_run_is_untouched(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["-q", "train", str(config)]) == 0
    run = tmp_path / "run"
    before = tree_hashes(run)
    extend = ["train", "--resume", str(run), "train.max_steps=5000"]
    code, lines = _sigterm_after(extend, 0.5)
    assert code == 3, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("kiln: stopped by SIGTERM before training started; ")
    assert lines[0].endswith(f"continue with: kiln train --resume {run}")  # outside the cwd
    assert tree_hashes(run) == before  # nothing the user had is touched


def _signalled_in_setup(monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    """Building the model gets a SIGTERM inside library code that catches every exception:
    it swallows the stop (`then="swallow"`) or turns it into its own error (`"wrap"`)."""
    import kiln.models.build

    build = kiln.models.build.build_model

    def hostile(*args: Any, **kwargs: Any) -> Any:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        except BaseException as exc:
            if then == "wrap":
                raise RuntimeError("a library's own error") from exc
        return build(*args, **kwargs)

    monkeypatch.setattr(kiln.models.build, "build_model", hostile)


@pytest.mark.parametrize("then", ["swallow", "wrap"])
def test_item20_a_setup_signal_caught_by_a_library_still_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], then: str
) -> None:
    """The flaky CI failure (exit 1, a traceback) and the resume that did not stop: whatever
    happens to `StoppedBeforeStart` on its way up, the start ends as the signal meant: one
    line, exit 3 with a checkpoint to resume, the run paused, no step taken."""
    config = _config(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["-q", "train", str(config)]) == 0
    run = tmp_path / "run"
    before = tree_hashes(run)
    capsys.readouterr()
    _signalled_in_setup(monkeypatch, then)
    code = main(["-q", "train", "--resume", str(run), "train.max_steps=6"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 3, lines
    assert lines == [
        f"kiln: stopped by SIGTERM before training started; continue with: "
        f"kiln train --resume {run}"
    ]
    after = tree_hashes(run)
    kept = {k: v for k, v in before.items() if k.startswith("checkpoints") or k == "metrics.jsonl"}
    assert {k: after[k] for k in kept} == kept  # no step taken, no checkpoint written
    assert read_status(run)["state"] == "paused", read_status(run)
    monkeypatch.undo()
    assert main(["-q", "train", "--resume", str(run), "train.max_steps=6"]) == 0  # the next start


# ---- 21: strict JSON when the loss is not finite -----------------------------------------------


@pytest.mark.slow
def test_item21_lr_1e6_diverges_with_strict_json_everywhere(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        optim={"lr": 1e6},
        train={"max_steps": 12},
        eval={"every_steps": 2, "max_batches": 1},
        log={"every_steps": 1},
    )
    assert main(["-q", "train", str(config)]) == 4  # diverged (docs/anomalies.md)
    run = tmp_path / "run"
    rows = [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val, rows
    assert val[0]["val_loss"] is None  # NaN is written as null
    assert _strict((run / "status.json").read_text())["exit_code"] == 4
    summary = _strict((run / "summary.json").read_text())
    assert summary["final_val"] is None or summary["final_val"].get("val_loss") is None
    for line in (run / "anomalies.jsonl").read_text().splitlines():
        _strict(line)
    assert main(["-q", "report", str(run)]) == 0  # kiln report reads the nulls


def test_item21_readers_give_null_for_nan_in_an_older_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "split": "val", "val_loss": NaN, "val_ppl": Infinity, "x": -Infinity}\n'
    )
    (tmp_path / "status.json").write_text('{"state": "running", "val": {"val_loss": NaN}}\n')
    records, _ = read_metrics(tmp_path)
    assert records == [{"step": 2, "split": "val", "val_loss": None, "val_ppl": None, "x": None}]
    # what the server streams (SSE) and serves is strict JSON
    assert _strict(json.dumps(records)) == records
    status = read_status(tmp_path)
    assert status is not None
    assert status["val"] == {"val_loss": None}


def test_item21_a_sweep_takes_a_null_metric_as_not_finite() -> None:
    """The sweep controller reads metrics.jsonl: a null val_loss (NaN when written) prunes the
    trial as non-finite, as the NaN did, and is never reported to the study."""
    import threading
    from types import SimpleNamespace

    from kiln.sweep.controller import Controller, _Trial

    reported: list[float] = []
    handle = SimpleNamespace(report=lambda v, step: reported.append(v), should_prune=lambda: False)
    spec = SimpleNamespace(metric="val_loss", pruner=SimpleNamespace(warmup_evals=0))
    controller = SimpleNamespace(sweep=SimpleNamespace(spec=spec), lock=threading.Lock())
    trial = _Trial(number=0, params={}, handle=handle)
    rows = [
        {"step": 2, "split": "val", "val_loss": 3.5},
        {"step": 4, "split": "val", "val_loss": None},
    ]
    Controller._report(controller, trial, rows)  # type: ignore[arg-type]
    assert reported == [3.5]
    assert trial.nonfinite
