"""Golden numbers: the first 30 losses of a tiny CPU fp32 run, committed before the issue-12
refactor, must stay exactly equal; a checkpoint written by that version must still resume and
continue to exactly the same losses. (`tests/golden/make_golden.py` wrote both.)

"Exactly" is to one float32 ulp of each logged loss: the weights are bit-identical across CPUs,
but the loss's reduction is summed in another order by other vector kernels (AVX2 against
AVX-512: 4 of the 30 losses differ by one ulp, every other bit-identical on an AVX2 EPYC). A
change to the math drifts the weights, and the losses then leave that bound within steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from golden_setup import golden_config, write_golden_data

from kiln import Trainer

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(losses: list[float], expected: list[float]) -> None:
    """Each loss equal to the golden one within one float32 ulp (see the module docstring)."""
    assert len(losses) == len(expected)
    got, want = np.asarray(losses, np.float32), np.asarray(expected, np.float32)
    off = np.abs(got - want) > np.spacing(np.abs(want))
    assert not off.any(), [(i, losses[i], expected[i]) for i in np.flatnonzero(off)]


def test_first_30_losses_are_exactly_the_golden_ones(tmp_path: Path) -> None:
    write_golden_data()
    expected = json.loads((GOLDEN / "losses_tiny.json").read_text())
    result = Trainer(golden_config(tmp_path / "run")).fit()
    assert len(expected) == 30
    assert_golden(result.loss_history, expected)


def test_a_checkpoint_of_the_pre_refactor_format_resumes_exactly(tmp_path: Path) -> None:
    write_golden_data()
    expected = json.loads((GOLDEN / "losses_tiny.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / "ckpt_v1", run)
    trainer = Trainer(golden_config(run), resume=True)
    result = trainer.fit()
    assert trainer.resumed_from == run / "checkpoints" / "step-10"
    assert_golden(result.loss_history, expected)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    assert steps.count(30) == 2  # one train and one val record at the last step, no duplicates
