"""Issue 27 item 1: kiln.runs owns the run directory (its layout, the run states and their
exit codes, the rollback-aware metrics follower, `run_dir_of`), and nothing else defines
them again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import load_config
from kiln.engine.rundir import RunDir
from kiln.runs import (
    ACTIVE_STATES,
    END_STATES,
    STATE_EXIT_CODES,
    STATES,
    ExitCode,
    MetricsTail,
    RunPaths,
    read_metrics,
)
from tests.helpers import tiny_raw


def test_item01_exit_codes_keep_their_values() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "FINISHED": 0,
        "FAILED": 1,
        "BAD_INPUT": 2,
        "PAUSED": 3,
        "DIVERGED": 4,
        "STORAGE_FULL": 5,
        "ABORTED": 130,
    }


def test_item01_every_end_state_has_its_exit_code() -> None:
    assert set(ACTIVE_STATES) | set(END_STATES) == set(STATES)
    assert not set(ACTIVE_STATES) & set(END_STATES)
    assert set(STATE_EXIT_CODES) == set(END_STATES)
    assert STATE_EXIT_CODES == {
        "finished": 0,
        "paused": 3,
        "stopped": 3,  # a pruned trial: resumable, as today
        "diverged": 4,
        "failed": 1,
    }


def test_item01_final_state_reads_the_table() -> None:
    from kiln.engine.control import StopRequest
    from kiln.engine.status import final_state

    assert final_state(None) == ("finished", ExitCode.FINISHED)
    cases = {
        "diverged": StopRequest("diverged", "loss is nan", resumable=False, write_final=False),
        "paused": StopRequest("signal", "SIGTERM", resumable=True, write_final=False),
        "stopped": StopRequest("pruned", "sweep", resumable=False, write_final=False),
        "finished": StopRequest("early_stop", "patience", resumable=False, write_final=True),
    }
    for state, stop in cases.items():
        assert final_state(stop) == (state, STATE_EXIT_CODES[state])


def _line(step: int, loss: float) -> dict[str, object]:
    return {"step": step, "split": "train", "loss": loss}


def test_item01_tail_follows_appends(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    tail = MetricsTail(run)
    assert tail.read() == ([], False)  # no file yet
    path = RunPaths(run).metrics
    path.write_text(json.dumps(_line(1, 2.0)) + "\n" + json.dumps(_line(2, 1.5))[:7])
    assert tail.read() == ([_line(1, 2.0)], False)
    with open(path, "a") as f:  # the torn line completes, another follows
        f.write(json.dumps(_line(2, 1.5))[7:] + "\n" + json.dumps(_line(3, 1.0)) + "\n")
    assert tail.read() == ([_line(2, 1.5), _line(3, 1.0)], False)
    assert tail.read() == ([], False)
    assert tail.records == [_line(1, 2.0), _line(2, 1.5), _line(3, 1.0)]
    assert tail.offset == path.stat().st_size


def test_item01_tail_sees_a_resume_rewrite_at_a_line_start(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    """The engine's resume (and anomaly rollback) replaces metrics.jsonl with the history up
    to the checkpoint, then logs again: the new file grows past the old offset, which falls
    on a line start of it (lines of equal length), so only the file's identity shows it."""
    run = tmp_path / "run"
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    rundir = RunDir(run)
    rundir.prepare(cfg, overwrite=False)
    for step in range(1, 5):
        rundir.log_metrics(_line(step, 1.5))
    tail = MetricsTail(run)
    new, rewritten = tail.read()
    assert (len(new), rewritten) == (4, False)
    offset = tail.offset

    rundir.resume(cfg, 2, anomalies=False)  # a rollback to step 2's checkpoint
    for step in range(3, 7):
        rundir.log_metrics(_line(step, 2.5))  # same length as the dropped lines
    rundir.close()
    history = [_line(1, 1.5), _line(2, 1.5)] + [_line(s, 2.5) for s in range(3, 7)]
    # The offset rule alone misses it: it reads on from the old offset as if appended.
    assert read_metrics(run, offset)[0] == history[4:]

    new, rewritten = tail.read()
    assert rewritten is True
    assert new == history  # the whole new history, re-read from byte 0
    assert tail.records == history  # the dropped rows (steps 3, 4 at 1.5) are gone
    assert tail.read() == ([], False)
    rundir.log_metrics(_line(7, 2.5))
    rundir.close()
    assert tail.read() == ([_line(7, 2.5)], False)
    assert tail.records == [*history, _line(7, 2.5)]


def test_item01_tail_sees_a_shorter_file_and_a_removed_one(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    path = RunPaths(run).metrics
    lines = [json.dumps(_line(s, 1.0)) + "\n" for s in range(1, 5)]
    path.write_text("".join(lines))
    tail = MetricsTail(run)
    assert len(tail.read()[0]) == 4
    with open(path, "r+") as f:  # cut in place (same file): the offset rule sees it
        f.truncate(len("".join(lines[:2])))
    assert tail.read() == ([_line(1, 1.0), _line(2, 1.0)], True)
    assert tail.records == [_line(1, 1.0), _line(2, 1.0)]
    path.unlink()  # a run started afresh (--overwrite) removes it
    assert tail.read() == ([], True)
    assert tail.records == []
    path.write_text(lines[0])
    assert tail.read() == ([_line(1, 1.0)], False)


@pytest.mark.parametrize(
    ("where", "resumed"),
    [("run", "run"), ("ckpt", "run"), ("final", None), ("bare_ckpt", None), ("empty", None)],
)
def test_item01_train_resume_uses_run_dir_of(tmp_path: Path, where: str, resumed: str) -> None:
    """`kiln train --resume PATH`: a run with its config and checkpoints/, or one of its
    checkpoints with a manifest; final/ and a checkpoint still without manifest are not."""
    from kiln.commands.train import _resumed_run

    run = tmp_path / "run"
    paths = RunPaths(run)
    paths.checkpoint(4).mkdir(parents=True)
    (paths.checkpoint(4) / "manifest.json").write_text("{}")
    paths.checkpoint(6).mkdir()
    paths.final.mkdir()
    paths.config.write_text("name: r\n")
    (tmp_path / "empty").mkdir()
    target = {
        "run": run,
        "ckpt": paths.checkpoint(4),
        "final": paths.final,
        "bare_ckpt": paths.checkpoint(6),
        "empty": tmp_path / "empty",
    }[where]
    assert _resumed_run(target) == (run if resumed else None)
