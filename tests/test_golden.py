"""Golden numbers: the first 30 losses of a tiny CPU fp32 run, committed before the issue-12
refactor, must stay exactly equal; a checkpoint written by that version must still resume and
continue to exactly the same losses. (`tests/golden/make_golden.py` wrote both.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from golden_setup import golden_config, write_golden_data

from kiln import Trainer

GOLDEN = Path(__file__).parent / "golden"


def test_first_30_losses_are_exactly_the_golden_ones(tmp_path: Path) -> None:
    write_golden_data()
    expected = json.loads((GOLDEN / "losses_tiny.json").read_text())
    result = Trainer(golden_config(tmp_path / "run")).fit()
    assert len(expected) == 30
    assert result.loss_history == expected  # exact: bit-identical float32 losses


def test_a_checkpoint_of_the_pre_refactor_format_resumes_exactly(tmp_path: Path) -> None:
    write_golden_data()
    expected = json.loads((GOLDEN / "losses_tiny.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / "ckpt_v1", run)
    trainer = Trainer(golden_config(run), resume=True)
    result = trainer.fit()
    assert trainer.resumed_from == run / "checkpoints" / "step-10"
    assert result.loss_history == expected
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    assert steps.count(30) == 2  # one train and one val record at the last step, no duplicates
