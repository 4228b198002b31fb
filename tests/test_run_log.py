"""The run directory kiln writes (issue 26): `--overwrite` clears every artifact of the earlier
run and nothing of the user's (item 25), and RUN_DIR/train.log keeps what `kiln train` printed
(item 30)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import tiny_raw

from kiln.cli import main
from kiln.config import load_config
from kiln.engine.console import (
    current_console_log,
    start_console_log,
    stop_console_log,
    terminal,
)
from kiln.engine.rundir import RUN_ARTIFACTS, RunDir

# ---- item 25: --overwrite clears what kiln wrote, and only that ----------------------------


def _earlier_run(run: Path) -> None:
    """Every artifact name, as a file or a directory with content, and staging leftovers."""
    run.mkdir(parents=True)
    for name in RUN_ARTIFACTS:
        if "." in name:
            (run / name).write_text("old\n")
        else:
            (run / name).mkdir()
            (run / name / "old.bin").write_text("old\n")
    (run / ".final.tmp-99999").mkdir()
    (run / ".export.kiln-export-abc").mkdir()
    (run / ".metrics.jsonl.tmp-99999").write_text("torn")


def test_item25_overwrite_removes_every_artifact_and_keeps_the_users(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    run = tmp_path / "run"
    _earlier_run(run)
    (run / "notes.md").write_text("mine\n")  # the user's own things
    (run / "my_data").mkdir()
    (run / "my_data" / "rows.jsonl").write_text("{}\n")
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    rundir = RunDir(run)
    rundir.claim()
    try:
        rundir.prepare(cfg, overwrite=True)
    finally:
        rundir.release()
    kept = sorted(p.name for p in run.iterdir())
    assert kept == [".kiln.lock", "config.yaml", "my_data", "notes.md"]  # the lock: kiln's own
    assert (run / "my_data" / "rows.jsonl").read_text() == "{}\n"
    assert "old" not in (run / "config.yaml").read_text()


def test_item25_overwrite_never_follows_a_link_out_of_the_run(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "bundle").mkdir(parents=True)
    (outside / "bundle" / "model.onnx").write_text("keep")
    (outside / "one.json").write_text("keep")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("old\n")
    (run / "export").symlink_to(outside / "bundle")  # a link in place of an artifact
    (run / "eval").symlink_to(tmp_path / "gone")  # a dangling one
    (run / "checkpoints" / "link").symlink_to(outside)  # a link inside an artifact
    (run / "summary.json").symlink_to(outside / "one.json")
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    RunDir(run).prepare(cfg, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert (outside / "bundle" / "model.onnx").read_text() == "keep"
    assert (outside / "one.json").read_text() == "keep"


def test_item25_without_overwrite_export_and_eval_are_an_earlier_run(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    for name in ("export", "eval"):
        run = tmp_path / f"run-{name}"
        (run / name).mkdir(parents=True)
        with pytest.raises(Exception, match=f"already holds a run \\({name}\\)"):
            RunDir(run).check_free(overwrite=False)


def test_item25_a_train_log_alone_is_not_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("kept by hand\n")
    assert RunDir(run).check_free(overwrite=False) == ["train.log"]


# ---- item 30: the console log ----------------------------------------------------------------


def test_item30_console_log_holds_lines_until_attached(tmp_path: Path) -> None:
    before = sys.stderr
    log = start_console_log()
    try:
        print("first", file=sys.stderr)
        sys.stdout.write("partial ")
        print("\x1b[1mbold\x1b[0m line")  # colour codes dropped
        sys.stderr.write("10%\r50%\r100%\n")  # a redrawn line: its last state
        assert not (tmp_path / "train.log").exists()
        log.attach(tmp_path / "train.log", append=False)
        print("after", file=sys.stderr)
        log.record("recorded only")
        assert terminal(sys.stderr) is before
    finally:
        stop_console_log()
    assert sys.stderr is before
    assert current_console_log() is None
    text = (tmp_path / "train.log").read_text()
    assert text == "first\npartial bold line\n100%\nafter\nrecorded only\n"


def _tiny_yaml(tmp_path: Path, recipe_files: tuple[Path, Path], **sections: object) -> Path:
    raw = tiny_raw(
        tmp_path,
        *recipe_files,
        train={"max_steps": 4, "batch_size": 4},
        optim={"lr": 3e-3, "warmup_steps": 0},
        log={"every_steps": 2, "progress": "plain", "plots": False},
        eval={"every_steps": 2, "max_batches": 1},
        checkpoint={"every_steps": 2},
        **sections,
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """Let `kiln.cli` configure logging as in a terminal: pytest's capture handlers, which it
    adds to the root logger for the test's call, stand aside inside the block."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_item30_train_log_keeps_what_kiln_train_printed(
    tmp_path: Path, recipe_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with cli_logging():
        _train_refuse_resume(tmp_path, recipe_files, capsys)
    with cli_logging():  # a new process's logging: -q applies
        _overwrite_quietly(tmp_path, capsys)


def _train_refuse_resume(
    tmp_path: Path, recipe_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = _tiny_yaml(tmp_path, recipe_files), tmp_path / "run"
    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    log = (run / "train.log").read_text().splitlines()
    printed = _lines(out) + _lines(err)
    assert [line for line in printed if line not in log] == []  # everything printed is kept
    assert "step 2/4  loss" in "\n".join(log)  # progress, kiln's info lines, the last lines
    assert any(line.startswith("kiln: ") for line in log)
    assert log[-1].startswith("final model: ")

    # A refused second start (the run directory holds a run) adds nothing to the log.
    assert main(["train", str(config)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "train.log").read_text().splitlines() == log

    # A resume appends, the closing lines included.
    assert main(["train", "--resume", str(run), "train.max_steps=6"]) == 0
    capsys.readouterr()
    resumed = (run / "train.log").read_text().splitlines()
    assert resumed[: len(log)] == log
    assert any(line.startswith("kiln: resumed from") for line in resumed[len(log) :])
    assert [line.startswith("run directory: ") for line in resumed].count(True) == 2


def _overwrite_quietly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite starts train.log afresh, with the rest of the earlier run's files (item
    25); -q leaves kiln's info lines out, the progress and the closing lines in."""
    config, run = tmp_path / "tiny.yaml", tmp_path / "run"
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_text("stale")
    (run / "eval").mkdir()
    (run / "mine.txt").write_text("mine")
    assert main(["-q", "train", str(config), "--overwrite"]) == 0
    out, err = capsys.readouterr()
    fresh = (run / "train.log").read_text().splitlines()
    assert [line.startswith("run directory: ") for line in fresh].count(True) == 1
    assert not (run / "export").exists()
    assert not (run / "eval").exists()
    assert (run / "mine.txt").read_text() == "mine"
    for text in (err, "\n".join(fresh)):
        assert "step 2/4  loss" in text
        assert "step 4/4  val_loss" in text
        assert "kiln: resumed" not in text
    assert not any(line.startswith("kiln: ") for line in _lines(err))
    assert "final model: " in out


def test_item30_no_train_log_when_the_run_directory_is_refused(
    tmp_path: Path, recipe_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file where the run directory goes")
    config = _tiny_yaml(tmp_path, recipe_files, output_dir=str(taken / "run"))
    with cli_logging():
        assert main(["train", str(config)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert list(tmp_path.rglob("train.log")) == []
    assert current_console_log() is None


def test_item30_a_progress_bar_leaves_plain_lines_in_the_log(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kiln.callbacks.progress import ProgressCallback

    run = SimpleNamespace(state=SimpleNamespace(step=0, total_steps=4))
    log = start_console_log()
    try:
        log.attach(tmp_path / "train.log", append=False)
        bar = ProgressCallback("bar")
        bar.on_train_begin(run)  # type: ignore[arg-type]
        for step in (1, 2):
            run.state.step = step
            bar.on_step_end(run)  # type: ignore[arg-type]
        train = {"split": "train", "step": 2, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1000.0}
        bar.on_log(run, train)  # type: ignore[arg-type]
        val = {"val_loss": 2.25, "val_ppl": 9.49, "val_accuracy": 0.5}
        bar.on_validation_end(run, val)  # type: ignore[arg-type]
        bar.on_train_end(run)  # type: ignore[arg-type]
    finally:
        stop_console_log()
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "step 2/4  loss 2.5000  lr 1.00e-03  1,000 tok/s",
        "step 2/4  val_loss 2.2500  ppl 9.49  acc 0.500",
    ]


def test_item30_a_handler_made_during_the_log_is_put_back_and_nothing_kept_after(
    tmp_path: Path,
) -> None:
    log = start_console_log()
    late = logging.StreamHandler(sys.stderr)  # made on the tee (as a library's first logger)
    library = logging.getLogger("kiln_test_library")
    library.addHandler(late)
    try:
        log.attach(tmp_path / "train.log", append=False)
        late.handle(logging.makeLogRecord({"msg": "from a late handler"}))
    finally:
        stop_console_log()
        library.removeHandler(late)
    assert late.stream is terminal(late.stream)  # no longer a tee
    print("after the log", file=sys.stderr)
    log.record("after the log")
    assert (tmp_path / "train.log").read_text() == "from a late handler\n"
