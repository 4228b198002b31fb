"""Regenerate the golden files by hand (never by the suite): `python tests/golden/make_golden.py`.

- `losses_tiny.json`: the first 30 CPU fp32 train losses of `golden_config`, written before the
  issue-12 refactor; `test_golden.py` asserts they stay exactly equal.
- `ckpt_v1/`: a run directory stopped (resumable) at step 10 by the checkpoint format of kiln
  0.1.0 before issue 12; `test_golden.py` resumes it and must reproduce losses 11..30 exactly.
Regenerating either is a decision to change the numbers (say so in the commit), not a fix.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_setup import DATA_DIR, golden_config, write_golden_data  # noqa: E402


def main() -> None:
    from kiln import Callback, Trainer

    write_golden_data()
    run = DATA_DIR / "make"
    shutil.rmtree(run, ignore_errors=True)
    result = Trainer(golden_config(run / "ref")).fit()
    (HERE / "losses_tiny.json").write_text(json.dumps(result.loss_history, indent=1) + "\n")

    class Pause(Callback):
        def on_step_end(self, trainer) -> None:  # the pre-issue-12 callback API
            if trainer.state.step == 10:
                trainer.request_stop("golden", resumable=True)

    Trainer(golden_config(run / "cut"), callbacks=[Pause()]).fit()
    target = HERE / "ckpt_v1"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run / "cut" / name, target / name)
    shutil.copytree(run / "cut" / "checkpoints", target / "checkpoints")
    print(f"wrote {HERE / 'losses_tiny.json'} and {target}")


if __name__ == "__main__":
    main()
