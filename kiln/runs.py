"""The run directory from the outside: its layout (the one place that knows it) and readers for
everything that drives runs without a live Trainer (sweeps, the REST server, a dashboard,
`kiln report`, `kiln eval`). The engine writes the directory; these functions only read it.

    runs/<name>/
      config.yaml              the resolved config, exactly what ran
      metrics.jsonl            one JSON record per line ({"step", "split", "loss", ...}),
                               appended and flushed a line at a time; a value that is not
                               a finite number (a diverging loss) is null
      status.json              what the run is doing now (rewritten atomically; `read_status`)
      summary.json             steps, tokens, timings, best and final metrics (at the end)
      data_stats.json          row, example and token counts of the data
      anomalies.jsonl          one JSON record per detected anomaly (`read_anomalies`),
                               appended and flushed like metrics.jsonl
      checkpoints/step-<N>/    manifest.json written last: complete only with a valid manifest
      final/                   the model and tokenizer, with kiln_config.yaml
      plots/ samples/ eval/    PNG curves, generated samples per step, `kiln eval` reports
      export/                  `kiln export` (and export.on_finish): the ONNX/TorchScript bundle
      report.md                `kiln report`
      train.log                what `kiln train` printed (its main rank), appended on resume

Light to import (no torch, no transformers, no kiln.engine): a server can poll many runs from
a small process. Typical use, tailing a live run:

    tail = MetricsTail(run_dir)
    while run_state(read_status(run_dir)) in ACTIVE_STATES:
        new, rewritten = tail.read()   # rewritten: a resume or rollback cut the history back;
        ...                            # tail.records is the whole current history

How a run ends (status.json's state, `kiln train`'s exit code): `STATE_EXIT_CODES`, `ExitCode`.
Whether a new run may start in a directory: `RUN_ARTIFACTS`, `held_run`, `held_run_refusal`,
`not_a_directory` (the rule `kiln train` applies before loading anything, and the engine again
when it claims the directory).

This module is the public face; the code lives in the `kiln.rundir` package: `layout` (the
names, `RunPaths`, the states and exit codes) and `read` (the readers). Import from here.
"""

from __future__ import annotations

from kiln.rundir.layout import (
    ACTIVE_STATES,
    ANOMALIES,
    CHECKPOINTS,
    CONFIG,
    DATA_STATS,
    END_STATES,
    EVAL,
    EXPORT,
    FINAL,
    FINAL_CONFIG,
    MANIFEST,
    METRICS,
    PLOTS,
    REPORT,
    RUN_ARTIFACTS,
    SAMPLES,
    STATE_EXIT_CODES,
    STATES,
    STATUS,
    STEP_PREFIX,
    SUMMARY,
    TRAIN_LOG,
    ExitCode,
    RunPaths,
    checkpoint_name,
    held_run,
    held_run_refusal,
    not_a_directory,
    run_dir_of,
    step_of,
)
from kiln.rundir.read import (
    STALE_AFTER_S,
    CheckpointEntry,
    MetricsTail,
    RunInfo,
    config_file,
    is_alive,
    list_checkpoints,
    list_runs,
    pid_running,
    read_anomalies,
    read_config_raw,
    read_metrics,
    read_status,
    read_summary,
    run_state,
)

__all__ = [
    "ACTIVE_STATES",
    "ANOMALIES",
    "CHECKPOINTS",
    "CONFIG",
    "DATA_STATS",
    "END_STATES",
    "EVAL",
    "EXPORT",
    "FINAL",
    "FINAL_CONFIG",
    "MANIFEST",
    "METRICS",
    "PLOTS",
    "REPORT",
    "RUN_ARTIFACTS",
    "SAMPLES",
    "STALE_AFTER_S",
    "STATES",
    "STATE_EXIT_CODES",
    "STATUS",
    "STEP_PREFIX",
    "SUMMARY",
    "TRAIN_LOG",
    "CheckpointEntry",
    "ExitCode",
    "MetricsTail",
    "RunInfo",
    "RunPaths",
    "checkpoint_name",
    "config_file",
    "held_run",
    "held_run_refusal",
    "is_alive",
    "list_checkpoints",
    "list_runs",
    "not_a_directory",
    "pid_running",
    "read_anomalies",
    "read_config_raw",
    "read_metrics",
    "read_status",
    "read_summary",
    "run_dir_of",
    "run_state",
    "step_of",
]
