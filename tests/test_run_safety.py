"""A user's runs and files are never lost or escaped from, whatever the command line says.

Each test is named after what it protects (issue 11): resuming into another run, paths with
`..`, an output_dir that is a file, a full disk, SIGTERM during setup, two processes on one run,
the pause hint, and the mode of files that hold the config. Files the user had are hashed before
and after every refused command.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_rows, start_train, tiny_raw, tree_hashes, write_jsonl

from kiln import Trainer
from kiln.checkpoint import CheckpointManager
from kiln.cli import main
from kiln.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _raw(tmp: Path, out: Path, **train: Any) -> dict[str, Any]:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(120, seed=1))
    return tiny_raw(
        tmp,
        data,
        None,
        name="safety",
        output_dir=str(out),
        optim={"warmup_steps": 1},
        train={"max_steps": 10, **train},
        checkpoint={"every_steps": 5},
    )


def _config_file(tmp: Path, out: Path, name: str = "cfg.yaml", **train: Any) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(_raw(tmp, out, **train)))
    return path


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("kiln: error:")]


def _metric_steps(run: Path) -> list[tuple[int, str]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["split"]) for r in map(json.loads, lines)]


# ---- 1. resuming into a directory that holds another run ---------------------------------------


def test_resume_into_another_finished_run_is_refused_and_leaves_it_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    cfg_a = _config_file(tmp_path, a, "a.yaml")
    assert main(["-q", "train", str(cfg_a)]) == 0
    assert main(["-q", "train", str(_config_file(tmp_path, b, "b.yaml"))]) == 0
    before = tree_hashes(b)
    capsys.readouterr()

    code = main(
        [
            "-q",
            "train",
            str(cfg_a),
            f"output_dir={b}",
            "--resume",
            str(a / "checkpoints" / "step-5"),
        ]
    )

    assert code == 2
    (line,) = _errors(capsys.readouterr().err)
    assert "already holds a run" in line
    assert "checkpoint of another run" in line
    assert tree_hashes(b) == before


def test_resume_into_another_run_with_overwrite_starts_it_cleanly_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    cfg_a = _config_file(tmp_path, a, "a.yaml")
    assert main(["-q", "train", str(cfg_a)]) == 0
    assert main(["-q", "train", str(_config_file(tmp_path, b, "b.yaml")), "train.max_steps=6"]) == 0
    a_before = tree_hashes(a)

    ckpt = a / "checkpoints" / "step-5"
    assert (
        main(["-q", "train", str(cfg_a), f"output_dir={b}", "--overwrite", "--resume", str(ckpt)])
        == 0
    )

    # B is A continued from step 5: A's history up to 5, then the same steps as A, once each.
    assert _metric_steps(b) == _metric_steps(a)
    a_losses = (a / "metrics.jsonl").read_text()
    assert (b / "metrics.jsonl").read_text().splitlines()[0] == a_losses.splitlines()[0]
    summary = json.loads((b / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["resumed_from"] == str(ckpt)
    assert yaml.safe_load((b / "config.yaml").read_text())["output_dir"] == str(b)
    assert tree_hashes(a) == a_before  # the source run is only read


# ---- 2. paths are resolved before they are checked ----------------------------------------------


def test_output_dir_through_a_missing_dir_and_dotdot_is_guarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "b"
    cfg = _config_file(tmp_path, run)
    assert main(["-q", "train", str(cfg)]) == 0
    before = tree_hashes(tmp_path / "runs")
    capsys.readouterr()

    sneaky = tmp_path / "runs" / "missing" / ".." / "b"
    assert main(["-q", "train", str(cfg), f"output_dir={sneaky}"]) == 2

    (line,) = _errors(capsys.readouterr().err)
    assert "already holds a run" in line
    assert tree_hashes(tmp_path / "runs") == before
    assert not (tmp_path / "runs" / "missing").exists()


def test_output_dir_that_is_the_configs_own_folder_is_refused_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    cfg = project / "config.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, project)))
    (project / "summary.json").write_text('{"mine": true}\n')
    before = tree_hashes(project)

    for extra in ([], ["--overwrite"]):
        assert main(["-q", "train", str(cfg), *extra]) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert "folder of the config being read" in line
    assert tree_hashes(project) == before


def test_name_cannot_leave_the_runs_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    raw = _raw(tmp_path, project)
    del raw["output_dir"]
    cfg = project / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    before = tree_hashes(tmp_path)
    monkeypatch.chdir(project)

    for name in ("..", "../../etc", "a/b"):
        assert main(["-q", "train", "config.yaml", f"name={name}"]) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert line.startswith("kiln: error: config.yaml: name:")
    assert tree_hashes(tmp_path) == before
    assert not (project / "runs").exists()


# ---- 10. an output_dir that cannot be a directory fails before any work ---------------------


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_dir_that_is_a_file_fails_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("my notes\n")
    out = blocker if where == "file" else blocker / "run"
    cfg = _config_file(tmp_path, out)

    assert main(["-q", "train", str(cfg)]) == 2

    (line,) = _errors(capsys.readouterr().err)
    assert f"output_dir: {blocker} is a file, not a directory" in line
    assert blocker.read_text() == "my notes\n"
    assert not (tmp_path / "cache").exists()  # checked before data preparation


# ---- 11. a full disk: one line, a documented exit code, nothing written before is lost ----------


def _file_size_limit(limit: int) -> Any:
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_while_checkpointing_exits_5_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _config_file(tmp_path, run)
    # The tokenization cache is written during setup; fill it first, with no limit.
    assert main(["-q", "train", str(cfg), f"output_dir={tmp_path / 'warm'}"]) == 0

    proc = start_train(cfg, preexec_fn=_file_size_limit(20_000))
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 5, err
    (line,) = _errors(err)
    assert re.fullmatch(
        rf"kiln: error: file size limit exceeded while writing checkpoint {run}/checkpoints/"
        r"step-5; no checkpoint was written yet",
        line,
    ), line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []  # no staging left


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs mounted inside tmp_path (needs root: CI and dev machines run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_while_checkpointing_names_the_last_complete_checkpoint(
    tmp_path: Path, small_disk: Path
) -> None:
    run = small_disk / "run"
    cfg = _config_file(tmp_path, run, max_steps=200)
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"every_steps": 2, "keep_last": 50}  # keeps them all: the disk fills
    raw["log"]["every_steps"] = 100
    cfg.write_text(yaml.safe_dump(raw))

    proc = start_train(cfg)
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 5, err
    (line,) = _errors(err)
    match = re.fullmatch(
        r"kiln: error: no space left on device while writing checkpoint (\S+); "
        r"the last complete checkpoint is (\S+)",
        line,
    )
    assert match, line
    manager = CheckpointManager(run / "checkpoints")
    complete = manager.list()
    assert len(complete) >= 2
    assert str(complete[-1].path) == match.group(2)
    for info in complete:  # every checkpoint written before the disk filled is intact
        manager.verify(info.path)
    assert manager.incomplete() == []


# ---- 13. SIGTERM during setup ------------------------------------------------------------------


def _signal_during_setup(monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    import kiln.engine.parts as parts_module

    real = parts_module.assemble_data

    def build(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signum)  # a real signal, delivered in the middle of setup
        return real(*args, **kwargs)

    monkeypatch.setattr(parts_module, "assemble_data", build)


def test_sigterm_during_setup_of_a_new_run_says_so_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    cfg = _config_file(tmp_path, run)
    _signal_during_setup(monkeypatch, signal.SIGTERM)

    assert main(["-q", "train", str(cfg)]) == 128 + signal.SIGTERM

    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == (
        "kiln: stopped by SIGTERM before training started; nothing to resume (start it again)"
    )
    # Nothing but status.json, which says what happened (the directory is the job's record).
    assert sorted(p.name for p in run.iterdir() if p.name != ".kiln.lock") == ["status.json"]
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("stopped", 128 + signal.SIGTERM)


def test_sigterm_during_setup_of_a_resume_keeps_the_pause_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    cfg = _config_file(tmp_path, run)
    assert main(["-q", "train", str(cfg), "train.max_steps=5"]) == 0
    before = tree_hashes(run)
    capsys.readouterr()
    _signal_during_setup(monkeypatch, signal.SIGTERM)

    assert main(["-q", "train", "--resume", str(run), "train.max_steps=10"]) == 3

    err = capsys.readouterr().err
    prefix = "kiln: stopped by SIGTERM before training started; continue with: kiln train --resume "
    assert err.strip().startswith(prefix)
    assert Path(err.strip().removeprefix(prefix)).resolve() == run.resolve()
    # Everything the run had is as it was; status.json says it is paused (exit 3).
    after = tree_hashes(run)
    assert json.loads((run / "status.json").read_text())["state"] == "paused"
    assert {k: v for k, v in after.items() if k != "status.json"} == {
        k: v for k, v in before.items() if k != "status.json"
    }


# ---- 14. one process per run directory -----------------------------------------------------------


def _wait_for(predicate: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_start_on_a_running_run_is_refused_naming_the_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = _config_file(tmp_path, run, max_steps=100_000)
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"every_steps": 2, "keep_last": 1}
    cfg.write_text(yaml.safe_dump(raw))
    first = start_train(cfg)
    try:
        _wait_for(lambda: CheckpointManager(run / "checkpoints").latest() is not None)
        for argv in (["train", str(cfg), "--resume"], ["train", "--resume", str(run)]):
            assert main(["-q", *argv]) == 2
            (line,) = _errors(capsys.readouterr().err)
            assert f"another kiln process (pid {first.pid}) is using this run directory" in line
        assert main(["-q", "train", str(cfg), "--overwrite"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait(timeout=60)
    # The kernel dropped the dead process's lock: a resume now goes ahead.
    assert (run / ".kiln.lock").read_text().strip() == str(first.pid)
    assert main(["-q", "train", "--resume", str(run), "train.max_steps=4"]) == 0


# ---- 17. the pause hint continues the same run, overrides included -----------------------------


def test_pause_hint_resumes_the_run_with_its_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.engine.trainer as trainer_module

    cfg = _config_file(tmp_path, tmp_path / "ignored")
    run = tmp_path / "elsewhere"
    real = trainer_module.Trainer._after_step

    def after_step(self: Trainer, counts: tuple[int, int]) -> None:
        if self.state.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler's preemption sends
        real(self, counts)

    monkeypatch.setattr(trainer_module.Trainer, "_after_step", after_step)
    code = main(["-q", "train", str(cfg), f"output_dir={run}", "train.max_steps=20"])
    assert code == 3
    out = capsys.readouterr().out
    hint = re.search(r"continue with: (kiln train .*)", out)
    assert hint is not None, out
    assert hint.group(1).startswith("kiln train --resume ")
    assert Path(hint.group(1).split()[-1]).resolve() == run.resolve()
    monkeypatch.undo()

    assert main(["-q", *hint.group(1).split()[1:]]) == 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20  # train.max_steps=20 came back from the run's config.yaml
    assert summary["resumed_from"] == str(run / "checkpoints" / "step-8")
    assert not (tmp_path / "ignored").exists()


def test_resume_from_a_checkpoint_path_alone_uses_its_runs_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["-q", "train", str(_config_file(tmp_path, run)), "train.max_steps=10"]) == 0

    assert main(["-q", "train", "--resume", str(run / "checkpoints" / "step-5")]) == 0

    assert json.loads((run / "summary.json").read_text())["steps"] == 10


# ---- 5. files that hold the config are private ------------------------------------------------


def test_files_that_hold_the_config_are_written_0600(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(load_config(data=_raw(tmp_path, run))).fit()
    private = [run / "config.yaml", run / "final" / "kiln_config.yaml"]
    private += [c / "config.yaml" for c in (run / "checkpoints").iterdir()]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_merge_is_refused_while_another_process_holds_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    raw = _raw(tmp_path, run)
    raw["lora"] = {"enabled": True, "r": 2}
    Trainer(load_config(data=raw)).fit()
    before = tree_hashes(run)
    holder = subprocess.Popen(  # another process holding the run's lock (as a training run does)
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kiln.files import RunLock;"
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
            str(run),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        assert main(["-q", "merge", str(run / "final"), str(tmp_path / "merged")]) == 2
        (line,) = _errors(capsys.readouterr().err)
        assert f"another kiln process (pid {holder.pid}) is using this run directory" in line
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert tree_hashes(run) == before
    assert not (tmp_path / "merged").exists()
    assert main(["-q", "merge", str(run / "final"), str(tmp_path / "merged")]) == 0
