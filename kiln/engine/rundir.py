"""The run directory contract: config.yaml, metrics.jsonl, final/, summary.json.

Only the main process writes (rank 0 once training is distributed). The directory's path is
resolved before any check (`kiln.files.resolve_path`), the directory is created and locked
(`kiln.files.RunLock`) before any setup work, and every file that replaces something (final/,
summary.json, config.yaml) is written to a temporary name and renamed into place
(`kiln.files.write_atomic`), so an interrupted run never leaves one half-written. metrics.jsonl
is the one file appended to: a line at a time, flushed, and cut back to the checkpoint's step on
resume. config.yaml and final/kiln_config.yaml are written with mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import RunConfig, dump_yaml
from kiln.engine.console import current_console_log
from kiln.errors import KilnError
from kiln.files import (
    LOCK_FILE,
    RunLock,
    fsync_tree,
    json_text,
    resolve_path,
    swap_dir,
    write_atomic,
    writing,
)
from kiln.runs import (
    EXPORT,
    FINAL,
    FINAL_CONFIG,
    RUN_ARTIFACTS,
    RunPaths,
    held_run,
    held_run_refusal,
    not_a_directory,
)

if TYPE_CHECKING:
    from kiln.engine.control import StopRequest
    from kiln.engine.state import TrainState
    from kiln.metrics.throughput import ThroughputMeter
    from kiln.models.sharding import Gathered

__all__ = ["RUN_ARTIFACTS", "RUN_LEFTOVERS", "RunDir"]

RUN_LEFTOVERS = (f".{FINAL}.tmp-*", f".{FINAL}.old-*", f".{EXPORT}.kiln-export-*", ".*.tmp-*")
"""Staging names of writes a kill interrupted (final/, an export, `write_atomic`): removed
with the artifacts by `--overwrite`."""


class RunDir:
    """Writes one run's directory."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = resolve_path(path, "output_dir")
        self.paths = RunPaths(self.path)
        self.enabled = enabled
        self._metrics_file: Any = None
        self._lock: RunLock | None = None
        self._created = False

    def claim(self) -> None:
        """Create the directory (checked first: not a file, creatable) and lock it.

        Called before any setup work, so a bad output_dir fails at once and a second process
        starting on the same run is refused before it touches anything.
        """
        if not self.enabled:
            return
        refused = not_a_directory(self.path)  # `kiln.preflight` applies it before loading too
        if refused:
            raise KilnError(refused)
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.path).acquire()
        except OSError as exc:
            raise KilnError(f"output_dir: cannot create {self.path}: {exc.strerror}") from None

    def release(self) -> None:
        """Unlock; a directory this run created and left empty (refused before it began) is
        removed. (One that failed or stopped during setup keeps its status.json.)"""
        if self._lock is None:
            return
        self._lock.release()
        self._lock = None
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def check_free(self, *, overwrite: bool, why: str = "") -> list[str]:
        """The run artifacts already here (`kiln.runs.held_run`, the rule `kiln.preflight`
        applies before loading too); raises unless `overwrite` allows replacing them."""
        existing, held = held_run(self.path)
        if held and not overwrite and self.enabled:
            raise KilnError(held_run_refusal(self.path, held, why))
        return existing

    def prepare(self, cfg: RunConfig, *, overwrite: bool) -> None:
        """Create the directory and write config.yaml; refuse to clobber an earlier run.

        What an earlier run left (`RUN_ARTIFACTS`, `RUN_LEFTOVERS`) is removed first, and
        nothing else: a file of the user's in the directory stays, and a symbolic link is
        removed itself, never followed out of the directory. The console log (train.log)
        then starts afresh.
        """
        if not self.enabled:
            return
        for name in self.check_free(overwrite=overwrite):
            _remove(self.path / name)
        mine = f"-{os.getpid()}"  # this process's own staging (status.json) is in use
        for pattern in RUN_LEFTOVERS:
            for stale in self.path.glob(pattern):
                if not stale.name.endswith(mine) and stale.name != LOCK_FILE:
                    _remove(stale)
        self.path.mkdir(parents=True, exist_ok=True)
        with writing(str(self.paths.config)):
            write_atomic(self.paths.config, dump_yaml(cfg), private=True)
        self._start_console_log(append=False)

    def _start_console_log(self, *, append: bool) -> None:
        """train.log: what `kiln train` printed so far, and from now on (nothing from the
        Python API, which starts no console log)."""
        console = current_console_log()
        if console is not None and self.enabled:
            with writing(str(self.paths.train_log)):
                console.attach(self.paths.train_log, append=append)

    def resume(
        self,
        cfg: RunConfig,
        step: int,
        *,
        metrics_from: Path | None = None,
        anomalies: bool = True,
        validation_pending: bool = False,
    ) -> None:
        """Continue a run at `step`: metrics.jsonl keeps exactly the records up to `step`
        (without the validation at `step` when the checkpoint has it still to do: the
        resumed run validates there again, and a run that once resumed to its end and wrote
        that row is then extended from the same checkpoint without a second one).

        A killed run may have logged past its last checkpoint; those lines are dropped so the
        resumed run writes them again, with no duplicate or missing step. `metrics_from`: the
        metrics.jsonl of another run whose checkpoint this run starts from (its history up to
        `step` is copied, so this run's curves are complete). anomalies.jsonl is cut back the
        same way, unless `anomalies` is False (a rollback keeps the record of why it went back).
        """
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        metrics = self.paths.metrics
        self.close()  # a rollback cuts the file this run is appending to
        cuts = {metrics: metrics if metrics_from is None else metrics_from}
        if anomalies:
            cuts[self.paths.anomalies] = self.paths.anomalies
        for target, source in cuts.items():
            kept = []
            if source.is_file():
                for line in source.read_text(errors="replace").splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line torn by the kill
                        continue
                    if not isinstance(record, dict) or record.get("step", 0) > step:
                        continue
                    redone = record.get("step") == step and record.get("split") == "val"
                    if not (validation_pending and redone):
                        kept.append(line + "\n")
            if kept or target == metrics:
                with writing(str(target)):
                    write_atomic(target, "".join(kept))
        with writing(str(metrics)):
            write_atomic(self.paths.config, dump_yaml(cfg), private=True)
        self._start_console_log(append=True)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (flushed, so a crash keeps what was logged);
        a value that is not a finite number is written null."""
        if not self.enabled:
            return
        with writing(str(self.paths.metrics)):
            if self._metrics_file is None:
                self._metrics_file = open(self.paths.metrics, "a")  # noqa: SIM115
            self._metrics_file.write(json_text(record) + "\n")  # NaN as null: strict JSON
            self._metrics_file.flush()

    def log_anomaly(self, record: dict[str, Any]) -> None:
        """Append one record to anomalies.jsonl (flushed; see `kiln.engine.anomaly`)."""
        if not self.enabled:
            return
        with writing(str(self.paths.anomalies)), open(self.paths.anomalies, "a") as f:
            f.write(json_text(record) + "\n")

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """Write `name` (`kiln.runs.SUMMARY`, `DATA_STATS`) atomically."""
        path = self.path / name
        if self.enabled:
            with writing(str(path)):
                write_atomic(path, json_text(data, indent=2) + "\n")
        return path

    def save_final(
        self,
        model: Any,
        tokenizer: Any,
        cfg: RunConfig,
        card: str = "",
        *,
        gathered: Gathered | None = None,
    ) -> Path:
        """Write final/ (save_pretrained model + tokenizer + kiln_config.yaml + README.md model
        card) into a staging directory, fsync it, and swap it in. `gathered`: the full weights
        of a sharded model (FSDP2), saved instead of the model's own shards."""
        final = self.paths.final
        if not self.enabled:
            return final
        tmp = self.path / f".{FINAL}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        from kiln.models.quiet import no_hf_progress

        try:
            with writing(str(final)), no_hf_progress():
                self._write_final(tmp, model, tokenizer, cfg, card, gathered)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the old final/, if any, is untouched
            raise
        old = self.path / f".{FINAL}.old-{os.getpid()}"
        swap_dir(tmp, final, old)
        if old.exists():
            shutil.rmtree(old)
        return final

    def _write_final(
        self,
        tmp: Path,
        model: Any,
        tokenizer: Any,
        cfg: RunConfig,
        card: str,
        gathered: Gathered | None,
    ) -> None:
        if gathered is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=gathered.state_dict)
        tokenizer.save_pretrained(tmp)
        write_atomic(tmp / FINAL_CONFIG, dump_yaml(cfg), private=True)
        if cfg.lora.enabled:  # the base's fingerprint; final/merged/ with lora.merge_on_finish
            from kiln.models.merge import finish_adapter

            fingerprint = None if gathered is None else gathered.fingerprint
            finish_adapter(model, tmp, cfg, fingerprint=fingerprint)
        if card:
            (tmp / "README.md").write_text(card)
        fsync_tree(tmp)

    def clean_stale(self) -> None:
        """Remove staging leftovers of a run that was killed while writing final/."""
        if not self.enabled or not self.path.is_dir():
            return
        for stale in self.path.glob(f".{FINAL}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def close(self) -> None:
        """Close open files."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None


def _remove(target: Path) -> None:
    """Remove one thing an earlier run wrote: a directory with everything in it (a link
    inside is removed, not followed: `shutil.rmtree`), a file, or a symbolic link (itself,
    never what it points to)."""
    if target.is_symlink() or not target.is_dir():
        target.unlink(missing_ok=True)
    else:
        shutil.rmtree(target)


def model_card(cfg: RunConfig, state: TrainState, *, final: Path | None = None) -> str:
    """A short README.md for final/: what was trained, on what, how well, and how to load it.

    `final`: where final/ is written (default: the config's run directory, resolved, + final);
    the loading snippet names it, so it runs as pasted.
    """
    where = json.dumps(str(final or RunPaths(resolve_path(cfg.run_dir, "output_dir")).final))
    model = cfg.model.name_or_path or (
        f"{cfg.model.arch} from scratch" if cfg.model.arch else "a model given in Python"
    )
    auto = "AutoModelForSeq2SeqLM" if cfg.task == "seq2seq" else "AutoModelForCausalLM"
    data = f"`{cfg.data.train}`" if cfg.data.train else "given in Python"
    if cfg.data.sources:  # a weighted mixture
        data = ", ".join(f"`{s.path}` (weight {s.weight:g})" for s in cfg.data.sources)
    lines = [
        f"# {cfg.name}",
        "",
        f"Trained with kiln: {cfg.task}, {model}"
        + (" + LoRA adapters" if cfg.lora.enabled else ""),
        "",
        "| | |",
        "|---|---|",
        f"| steps | {state.step} |",
        f"| tokens | {state.tokens_seen:,} |",
        f"| training data | {data} |",
        f"| final train loss | {_fmt(state.last_train_loss)} |",
    ]
    for key, value in state.last_val.items():
        lines.append(f"| final {key} | {_fmt(value)} |")
    if state.best_metric is not None:
        lines.append(
            f"| best {cfg.checkpoint.metric} | {_fmt(state.best_metric)} (step {state.best_step}) |"
        )
    loader = (
        "from peft import AutoPeftModelForCausalLM as M"
        if cfg.lora.enabled and cfg.task != "seq2seq"
        else f"from transformers import {auto} as M"
    )
    lines += [
        "",
        "```python",
        loader,
        "from transformers import AutoTokenizer",
        f"model = M.from_pretrained({where})",
        f"tokenizer = AutoTokenizer.from_pretrained({where})",
        "```",
        "",
        "The resolved config that produced this model is in `kiln_config.yaml`.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    from kiln.metrics.display import format_metric

    return format_metric(value)


def run_summary(
    cfg: RunConfig,
    state: TrainState,
    *,
    model: Any,
    device: Any,
    train_examples: int,
    tracker: ThroughputMeter | None,
    wall: float,
    final_dir: Path | None,
    sample: str | None,
    stop: StopRequest | None,
    final_from: dict[str, Any] | None,
    resumed_from: Path | None,
    checkpoints: list[Path],
) -> dict[str, Any]:
    """summary.json: what ran, how long, how fast, how well, and where the results are."""
    from kiln.models import count_parameters

    total, trainable = count_parameters(model)
    return {
        "name": cfg.name,
        "task": cfg.task,
        "steps": state.step,
        "epochs": state.epoch + state.cursor / max(1, train_examples),
        "tokens": state.tokens_seen,
        "samples": state.samples_seen,
        "wall_time_s": wall,  # this process's (a resumed run: since the resume)
        # tokens_per_s, samples_per_s: what this process trained over its wall time (not the
        # run's total tokens, which earlier processes trained); peak_memory_mb, mfu (None
        # where the device's peak FLOP/s is unknown)
        **(tracker.summary(state.tokens_seen, state.samples_seen, wall=wall) if tracker else {}),
        "parameters": total,
        "trainable_parameters": trainable,
        "device": str(device),
        "precision": cfg.train.precision,
        "final_train_loss": state.last_train_loss,
        "best_metric": {
            "name": cfg.checkpoint.metric,
            "value": state.best_metric,
            "step": state.best_step,
        },
        "final_val": state.last_val,
        "stop_reason": None if stop is None else stop.reason,
        "stop": None if stop is None else stop.to_dict(),
        "final_dir": None if final_dir is None else str(final_dir),
        "final_weights": final_from,  # {"weights": last|best, "step"}
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "checkpoints": [str(p) for p in checkpoints],
        "sample": sample,
    }
