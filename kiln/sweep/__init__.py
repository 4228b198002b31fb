"""`kiln sweep`: hyperparameter search on Optuna, where every trial is a normal kiln run.

A sweep file is a run config plus a `sweep:` section (`kiln.config.sweep.SweepConfig`). The
controller validates the base config and every candidate before it launches, then runs each
trial as a `kiln train` subprocess in `<sweep dir>/trials/<NNNN>/` and follows it only through
its run directory and exit code: each validation row of metrics.jsonl is reported to Optuna,
and a trial Optuna prunes is sent SIGUSR1 (it checkpoints and stops as `stopped`, exit 3, no
final/). Exit 0 completes a trial with its best metric; 2 (bad input) fails it, not retried; 4
(diverged) prunes it and marks it infeasible, so the sampler learns to avoid the region; 3
without a prune (the sweep was interrupted) leaves it running in the study, and the next
`kiln sweep` on the same directory resumes it from its checkpoint with `kiln train --resume`.
SIGTERM or Ctrl-C to the controller, or `sweep.timeout_s` running out, pauses the running
trials that way and the command exits 3. Trial N's candidate is drawn from (`sweep.seed`, N)
(`kiln.sweep.samplers`), so controllers and agents sharing a study never replay each other.

The sweep directory holds sweep.yaml (the file as resolved), base.yaml (the run config the
trials start from), study.journal (the Optuna journal: the default storage, no server),
trials.csv, best.yaml (a config `kiln train` runs as is: the best trial's, writing into
`<sweep dir>/best`) and report.md. The controller never imports torch.
"""

from __future__ import annotations

from kiln.sweep.controller import Controller, agent, run
from kiln.sweep.outputs import report, status, summarize, write_outputs
from kiln.sweep.study import Sweep, load_sweep, open_study

__all__ = [
    "Controller",
    "Sweep",
    "agent",
    "load_sweep",
    "open_study",
    "report",
    "run",
    "status",
    "summarize",
    "write_outputs",
]
