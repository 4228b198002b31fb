"""Review leftovers (issue 28, helper HC): bad input told once under a bare torchrun (item 2),
an early stop's checkpoint at the stop step (item 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_config, tiny_raw

from kiln import Trainer
from kiln.cli import main
from kiln.launcher import LINES_ENV
from kiln.runs import RunPaths, list_checkpoints, read_status

# ---- item 2: `torchrun -m kiln train bad.yaml` says the bad input once, on rank 0 -------------


def _bad_config(tmp_path: Path) -> Path:
    """A config whose one problem is a mistyped key (train.max_stepz)."""
    raw = tiny_raw(tmp_path, tmp_path / "train.jsonl", None, train={"max_stepz": 5})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("rank", [None, "0", "1", "3"])
def test_item02_bad_config_is_said_by_rank_0_only(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rank: str | None,
) -> None:
    monkeypatch.delenv(LINES_ENV, raising=False)  # a bare torchrun, not `kiln train --nproc`
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert main(["train", str(_bad_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    if rank in (None, "0"):
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("kiln: error: ")
        assert "train.max_stepz" in lines[0]
    else:
        assert err == ""


@pytest.mark.parametrize("rank", ["0", "2"])
def test_item02_bad_arguments_are_said_by_rank_0_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str
) -> None:
    monkeypatch.delenv(LINES_ENV, raising=False)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as stop:
        main(["train", "c.yaml", "--no-such-flag"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert err.startswith("kiln: error: "), err
        assert len(err.splitlines()) == 1, err
    else:
        assert err == ""


def test_item02_kiln_launcher_ranks_still_leave_their_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under `kiln train --nproc` every rank leaves its line in the launcher's folder, which
    # prints each distinct line once (a line only rank 1 saw is not lost).
    from kiln.launcher import closing_lines

    folder = tmp_path / "lines"
    folder.mkdir()
    monkeypatch.setenv(LINES_ENV, str(folder))
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(_bad_config(tmp_path))]) == 2
    assert capsys.readouterr().err == ""
    lines, code = closing_lines(folder, signalled=False)
    assert code == 2
    assert len(lines) == 1
    assert "train.max_stepz" in lines[0]


# ---- item 3: an early stop writes the checkpoint of its step, as the end of training does -----


def _early_stop_config(tmp_path: Path, recipe_files: tuple[Path, Path], **train: Any) -> Any:
    """Validation every 2 steps; early stopping that never sees an improvement (min_delta
    huge): the 2nd validation (step 4) stops the run. Checkpoints every 5 steps (and, by the
    docs, at the last step)."""
    return tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 40, "batch_size": 4, **train},
        eval={
            "every_steps": 2,
            "max_batches": 1,
            "early_stopping": {"enabled": True, "patience": 1, "min_delta": 1e9},
        },
        checkpoint={"every_steps": 5, "every_minutes": None},
    )


def test_item03_early_stop_saves_a_checkpoint_at_the_stop_step(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    result = Trainer.from_config(_early_stop_config(tmp_path, recipe_files)).fit()
    run = RunPaths(tmp_path / "run")
    assert result.summary["steps"] == 4  # stopped at the 2nd validation, before step 5
    # The stop step's state is kept, as a run that ends at max_steps keeps its last step's.
    assert [c.step for c in list_checkpoints(run.root)] == [4]
    (entry,) = list_checkpoints(run.root)
    assert entry.complete
    assert entry.manifest is not None
    assert entry.manifest["step"] == 4
    assert [p.name for p in result.checkpoint_paths] == ["step-4"]
    # And it says it stopped early: summary.json, status.json (a finished run, exit 0).
    assert result.summary["stop_reason"].startswith("early stopping: val_loss")
    status = read_status(run.root)
    assert status is not None
    assert (status["state"], status["exit_code"]) == ("finished", 0)
    assert status["stop"]["kind"] == "early_stop"
    assert status["step"] == 4
    assert run.final.is_dir()
