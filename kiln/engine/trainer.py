"""Trainer: runs the loop over what `build_parts` made, fires events, writes the run.

The Trainer runs the callbacks the config asks for plus those it is given (`kiln.job`);
callbacks see a read-only `RunView` and steer through `Control`. Loop state lives in
one `LoopState`; a checkpoint is a named map of stateful components (`engine/resume.py`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.callbacks.base import Callback
from kiln.checkpoint import CheckpointManager
from kiln.config import RunConfig, config_hash
from kiln.data import BatchCursor
from kiln.data.assemble import Given
from kiln.engine import feed
from kiln.engine.anomaly import clip_grad_norm
from kiln.engine.cadence import Cadence
from kiln.engine.control import CheckpointKind, Control, RunView, StopRequest
from kiln.engine.elastic import Shares, plan, record_world
from kiln.engine.evaluate import restore_best, validate
from kiln.engine.events import Event
from kiln.engine.generate_eval import GenerationEval, end_sample
from kiln.engine.judge import Judge
from kiln.engine.loadable import write_loadable
from kiln.engine.loss import sum_in_order, target_tokens
from kiln.engine.parts import Parts, build_parts
from kiln.engine.result import THROUGHPUT_KEYS, TrainResult
from kiln.engine.resume import (
    callback_keys,
    check_compatible,
    checkpoint_writers,
    explain_failure,
    restore_checkpoint,
    resume_target,
    schedule_change,
    write_shards,
)
from kiln.engine.rundir import RunDir, model_card, run_summary
from kiln.engine.signals import StopSignals
from kiln.engine.state import LoopState, TrainState
from kiln.engine.status import StatusFile, final_state
from kiln.metrics.throughput import ThroughputMeter, meter_for
from kiln.models.sharding import gather_final
from kiln.optim import set_lr
from kiln.process import ProcessState
from kiln.rank import RankContext
from kiln.runs import DATA_STATS, SUMMARY, RunPaths

__all__ = ["TrainResult", "Trainer"]

log = logging.getLogger("kiln")


class Trainer:
    """Runs one training job described by a `RunConfig`.

    Pass `model`, `tokenizer`, `train_data` or `val_data` to use your own objects instead of
    building them from the config. `resume`: True (or "latest") continues from the newest
    complete checkpoint of the run directory, a path from that checkpoint; None follows
    `checkpoint.resume` (auto: resume when there is a checkpoint). Data may be text rows
    (lists of dicts or strings, torch or `datasets` datasets; they go through the same
    pipeline as files) or token ids (see docs/python_data.md). The config is the source of
    truth: what it asks for (progress, early stopping, trackers, notifications, plots, export
    on finish) runs whichever entry point builds the trainer; `callbacks` are added to those
    (one of the same class takes the config's one's place), and `config_callbacks=False`
    leaves the config's out (`kiln.job.job_callbacks`)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        callbacks: Sequence[Callback] = (),
        config_callbacks: bool = True,
        overwrite: bool = False,
        resume: str | Path | bool | None = None,
        rank: RankContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.given = Given(model, tokenizer, train_data, val_data)
        self.overwrite = overwrite
        self.resume = resume
        dist = cfg.train.distributed
        self.rank = rank or RankContext.setup(dist.backend, dist.timeout_s)
        self.loop = LoopState()
        self.control = Control()
        from kiln.job import job_callbacks  # the one assembly, whichever entry point

        self.callbacks = job_callbacks(cfg, callbacks, self.rank, config=config_callbacks)
        callback_keys(self.callbacks)
        self.run_dir = RunDir(cfg.run_dir, enabled=self.rank.is_main)  # resolved before checks
        rotation = cfg.checkpoint.model_dump(include={"keep_last", "keep_best", "metric", "mode"})
        self.checkpoints = CheckpointManager(self.run_dir.paths.checkpoints, **rotation)
        self.status = StatusFile(self.run_dir.path, enabled=self.rank.is_main)
        self.view = RunView(cfg, self.loop.state, self.run_dir.path, self.control, self.rank)
        self.judge = Judge(  # train.anomaly: records, rolls back, stops as diverged
            cfg,
            rank=self.rank,
            run_dir=self.run_dir,
            checkpoints=self.checkpoints,
            control=self.control,
            loop=self.loop,
            callbacks=self.callbacks,
            rewound=self._rewind,
        )
        # Generation eval (eval.generate): metric names are resolved here, before any work.
        self.generation_eval = GenerationEval(cfg) if cfg.eval.generate.num_samples else None
        self.cadence = Cadence(cfg)  # when validation and checkpoints fall due
        self.parts: Parts | None = None
        self.checkpoint_paths: list[Path] = []
        self.resumed_from: Path | None = None
        self.final_from: dict[str, Any] | None = None  # which weights final/ holds
        self.meter: ThroughputMeter | None = None
        self.cursor: BatchCursor | None = None
        self.shares = Shares(cfg.train.batch_size, cfg.train.batch_size)  # `_begin` plans them
        self.prefetch: Any = None  # a Prefetcher (data.loader_workers), or None
        self._resume_from: Path | None = None
        self._start_time = time.perf_counter()

    @classmethod
    def from_config(cls, cfg: RunConfig, **kwargs: Any) -> Trainer:
        """The trainer `kiln train` runs (`kiln.job.build_trainer`): the same as the
        constructor, with the rank context set up first."""
        from kiln.job import build_trainer

        return build_trainer(cfg, trainer_cls=cls, **kwargs)

    # ---- what the run is built from -----------------------------------------------------------

    @property
    def state(self) -> TrainState:
        return self.loop.state

    @property
    def history(self) -> list[dict[str, float]]:
        return self.loop.history

    @property
    def loss_history(self) -> list[float]:
        return self.loop.loss_history

    def _part(self, name: str) -> Any:
        if self.parts is None:
            raise AttributeError(f"Trainer.{name}: not built yet (call setup() or fit())")
        return getattr(self.parts, name)

    model = property(lambda self: self.given.model if self.parts is None else self.parts.model)
    tokenizer = property(
        lambda self: self.given.tokenizer if self.parts is None else self.parts.tokenizer
    )
    device = property(lambda self: self._part("device"))
    precision = property(lambda self: self._part("precision"))
    optimizer = property(lambda self: self._part("optimizer"))
    train_data = property(lambda self: self._part("train_data"))
    val_data = property(lambda self: self._part("val_data"))
    curriculum = property(lambda self: self._part("curriculum"))
    augmented = property(lambda self: self._part("augmented"))
    pad_id = property(lambda self: self._part("pad_id"))

    def setup(self) -> Parts:
        """Build device, data, tokenizer, model and optimizer (idempotent; `fit` calls it)."""
        if self.parts is None:
            self.parts = build_parts(self.cfg, self.given, self.rank)
            self.state.total_steps = self.parts.total_steps
            self.view.bind(self.parts)
        return self.parts

    # ---- requests ------------------------------------------------------------------------------

    def _on_signal(self, reason: str) -> None:
        self.control.request_stop(StopRequest("signal", reason, resumable=True))

    def _on_prune(self) -> None:  # SIGUSR1: a sweep gave up on this trial
        self.control.request_stop(StopRequest("pruned", "pruned (SIGUSR1)", write_final=False))

    @property
    def throughput(self) -> dict[str, float]:
        """Speed at the latest logged train step (`RunView.throughput`; callbacks read it
        there); after fit(), `TrainResult.throughput` has the whole run's too."""
        return self.view.throughput

    def _final_wanted(self) -> bool:
        """Whether the run ends with a final validation and final/ (not a pause or a prune)."""
        stop = self.control.decided
        return stop is None or stop.ends_run

    # ---- the run ------------------------------------------------------------------------------

    def fire(self, event: Event, **payload: Any) -> None:
        """Call `on_<event>` on every callback, in order, with the run's view."""
        method = event.method
        for cb in self.callbacks.listening(method):  # those that do something on it
            getattr(cb, method)(self.view, **payload)

    def fit(self) -> TrainResult:
        """Train to the end (or a stop request), validate, write final/ and summary.json.

        EXCEPTION fires for any error from here on, setup included (a failure notification
        must not depend on how far the run got). The process-wide state the run touches
        (global RNGs, threads, TF32, signal handlers) is restored when fit() returns or raises."""
        with ProcessState() as process:
            result = self._fit()
        if process.stray:
            log.warning("threads left running after fit(): %s", [t.name for t in process.stray])
        return result

    def _fit(self) -> TrainResult:
        final_dir, sample = None, None
        with StopSignals(self._on_signal, self._on_prune) as signals:
            try:
                self._begin()
                signals.start()  # from here a signal pauses with a checkpoint
                self.fire(Event.TRAIN_BEGIN)
                self.status.write("running", self.state)
                if self.loop.validation_pending:  # a stop interrupted it before the checkpoint
                    self._validate()
                while self.state.step < self.state.total_steps and not self.control.stopping:
                    self._after_step(self._train_step())
                self.control.close()  # the outcome is decided
                if self._final_wanted() and self._flush_train():
                    final_dir, sample = self._finish()
                summary = self._summary(final_dir, sample)
                self.run_dir.write_json(SUMMARY, summary)
                self.fire(Event.TRAIN_END)
                self.status.end(self.state, self.control.decided)
            except BaseException as exc:
                signals.arm()  # a SIGTERM now (torchrun ending a dead rank's peers) is moot
                self.control.close()
                resumable = self._resume_from is not None
                explained = explain_failure(
                    exc, self.run_dir.path, self.checkpoints, resumable=resumable, rank=self.rank
                )
                self.status.end(self.state, self.control.decided, explained)
                self.fire(Event.EXCEPTION, exc=explained)
                if explained is exc:
                    raise
                raise explained from exc
            finally:
                if self.prefetch is not None:
                    self.prefetch.close()
                self.run_dir.close()
                self.run_dir.release()
        return TrainResult(
            run_dir=self.run_dir.path,
            loss_history=self.loss_history,
            metrics=self.history,
            best_step=self.state.best_step,
            best_metric=self.state.best_metric,
            final_dir=final_dir,
            checkpoint_paths=self.checkpoint_paths,
            summary=summary,
            sample=sample,
            status=final_state(self.control.decided)[0],
            stop=self.control.decided,
        )

    def _begin(self) -> None:
        """Everything before the first step: the run directory, setup, resume, the cursor."""
        self.run_dir.claim()  # checked, created and locked before minutes of setup
        want = self.resume
        if want is None:
            want = "auto" if self.cfg.checkpoint.resume == "auto" else False
        resume_from, foreign = resume_target(
            want, self.checkpoints, self.run_dir, overwrite=self.overwrite
        )
        self._resume_from, world = resume_from, self.rank.world_size
        self.status.begin(resumed=resume_from is not None)
        self.cfg, self.shares = plan(self.cfg, world, resume_from)  # elastic: this rank's share
        self.view.cfg = self.cfg
        # Before setup and config.yaml: a refused resume leaves only status.json (failed).
        changes = [] if resume_from is None else check_compatible(self.cfg, resume_from, world)
        parts, cfg = self.setup(), self.cfg
        if foreign or resume_from is None:
            self.run_dir.prepare(cfg, overwrite=self.overwrite)
            self.status.write()  # prepare() cleared the directory
        self.rank.barrier("run directory prepared")  # the main rank has prepared it
        if resume_from is not None:
            self._restore(resume_from, changes, forked=foreign)
        record_world(self.status, self.run_dir, self.rank, self.state.step, resume_from)
        self.checkpoints.clean_incomplete()
        self.run_dir.clean_stale()
        if parts.data_stats:
            self.run_dir.write_json(DATA_STATS, parts.data_stats)
        self._start_time = time.perf_counter()
        self.meter = meter_for(cfg, parts.model, parts.device)
        self.meter.start(self.state.tokens_seen, self.state.samples_seen, self._start_time)
        self.meter.seed_window(self.loop.loss_history)  # loss_avg goes on across a resume
        self.cursor = feed.make_cursor(cfg, parts, self.state, self.rank)
        self.prefetch = feed.make_prefetcher(cfg, parts)
        self.loop.epoch_started = self.state.cursor > 0
        self.loop.epochs_ended = 0
        self.cadence.reset()

    def _restore(self, path: Path, changes: list[str], *, forked: bool = False) -> None:
        parts = self.setup()
        restore_checkpoint(path, parts, self.loop, self.callbacks, self.rank)
        self.resumed_from = self.view.resumed_from = path
        # Forked from another run's checkpoint: its history up to that step comes along.
        source = RunPaths(path.parent.parent).metrics if forked else None
        pending = self.loop.validation_pending  # its row, if written, is written again
        self.run_dir.resume(
            self.cfg, self.state.step, metrics_from=source, validation_pending=pending
        )
        log.info("resumed from %s (step %d)", path, self.state.step)
        for line in changes:
            log.info("config changed since the checkpoint: %s", line)
        total, saved = parts.total_steps, self.state.total_steps
        for line in filter(None, [schedule_change(self.cfg, path, self.state.step, saved, total)]):
            log.info("%s", line)
        self.state.total_steps = total
        self.checkpoint_paths = [c.path for c in self.checkpoints.list()]

    def _rewind(self) -> None:
        """The data cursor and the loss_avg window at the restored position (after a
        rollback: the rolled-back steps leave the window, as they left loss_history)."""
        self.cursor = feed.make_cursor(self.cfg, self.setup(), self.state, self.rank)
        if self.meter is not None:
            self.meter.seed_window(self.loop.loss_history)

    def _after_step(self, counts: tuple[int, int]) -> None:
        """What falls due after a step: on N ranks agreeing on requests and counts (one
        collective), the log, epoch ends, validation and checkpoints."""
        cfg, state, loop, step = self.cfg, self.state, self.loop, self.state.step
        if self.rank.is_main and self.cadence.minutes_due():  # agreed on below, on N ranks
            self.control.request_save()
        if self.rank.distributed:  # every rank decides the same from here on
            counts = self.control.sync(self.rank, counts)  # type: ignore[assignment]
            state.tokens_seen += counts[0]
            state.samples_seen += counts[1]
        # A pause (resumable stop) keeps the log cadence, so a resumed run logs identically.
        last_step = step == state.total_steps or (self.control.stopping and self._final_wanted())
        if step % cfg.log.every_steps == 0 or last_step:
            if self.judge.review(self.setup()):  # rolled back: those steps run again
                return
            self._log_train()
        if self.judge.diverged:
            return  # no validation, no checkpoint: the last complete one is the good one
        ended, loop.epochs_ended = loop.epochs_ended, 0
        for _ in range(ended):
            self.fire(Event.EPOCH_END)
            loop.epoch_started = False
        last = step == self.state.total_steps or self.control.stopping
        due = self.cadence.eval_due(step, state.epoch, ended) or (last and self._final_wanted())
        if self.val_data is not None and due:
            self._validate()
            self.control.sync(self.rank)  # requests made during validation (early stopping)
            # An early stop asked for in this validation makes this step the last one: it
            # gets the last step's checkpoint, as the end of max_steps does.
            last = last or self.control.stopping
        if not self._flush_train():  # stopped after the log point: rolled back or diverged
            return
        periodic = self.cadence.checkpoint_due(step, state.epoch, ended, last)
        # Paused or pruned (also by a request made during this validation): resumable.
        held = self.control.stopping and not self._final_wanted()
        if held:
            self.save_checkpoint("pause")
        elif periodic or self.control.save_requested:
            self.save_checkpoint("best" if self.loop.best_due else "periodic")

    def save_checkpoint(self, kind: CheckpointKind = "periodic") -> Path | None:
        """Write a complete checkpoint of the current step (atomically) and rotate; None on
        ranks other than the main one (which writes it)."""
        self.control.save_requested = self.loop.best_due = False
        self.cadence.reset()
        parts, main, step = self.setup(), self.rank.is_main, self.state.step
        if not self.judge.may_write(parts):  # judged first; nothing non-finite is kept
            return None
        staging = write_shards(self.checkpoints, parts, self.rank, step)  # FSDP: every rank
        staging = write_loadable(self.checkpoints, parts, self.rank, step, staging)  # HF, PEFT
        # On every rank: the RNG states are gathered.
        writers = checkpoint_writers(self.cfg, parts, self.loop, self.callbacks, self.rank)
        if not main:
            self.rank.barrier("checkpoint written")
            return None
        history = self.history
        metrics = history[-1] if history and history[-1]["step"] == step else {}
        path = self.checkpoints.save(
            step,
            writers,
            metrics={k: v for k, v in metrics.items() if k != "step"},
            config_hash=config_hash(self.cfg),
            staging=staging,
        )
        self.rank.barrier("checkpoint written")
        if path not in self.checkpoint_paths:
            self.checkpoint_paths.append(path)
        self.checkpoint_paths = [p for p in self.checkpoint_paths if p.exists()]
        self.fire(Event.CHECKPOINT, path=path, kind=kind)
        return path

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of the seeded epoch order; crosses epochs as needed."""
        parts, cursor, loop = self.setup(), self.cursor, self.loop
        assert cursor is not None
        epoch, before = cursor.epoch, cursor.state_dict()
        eligible = feed.eligible_samples(parts, self.state.step)
        idx = cursor.next_indices(eligible)
        parts.guard.drew(idx)
        loop.epochs_ended += cursor.epoch - epoch
        self.state.epoch, self.state.cursor = cursor.epoch, cursor.cursor
        if self.prefetch is not None and eligible is None:  # built ahead, the same batch
            return self.prefetch.take(cursor, before, idx)
        # Packed blocks: one gather, no attention mask; position ids restart per document.
        return parts.batcher(feed.epoch_data(parts, cursor.last_epoch), idx)

    def _train_step(self) -> tuple[int, int]:
        """One optimizer step; returns this rank's (input tokens, samples) of the window."""
        cfg, state, loop, parts = self.cfg, self.state, self.loop, self.setup()
        device, task = parts.device, cfg.task
        if not loop.epoch_started:
            loop.epoch_started = True
            self.fire(Event.EPOCH_BEGIN)
        self.fire(Event.STEP_BEGIN)
        batches, tokens, samples = [], 0, 0
        drawn = [self._next_batch() for _ in range(cfg.train.grad_accum_steps)]
        for batch in self.shares.split(drawn, task):
            tokens += feed.input_tokens(batch)  # host-side, on the CPU copy
            samples += batch["input_ids"].shape[0]
            if device.type != "cpu":
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batches.append(batch)
        if not self.rank.distributed:  # on N ranks: summed at the step's sync
            state.tokens_seen += tokens
            state.samples_seen += samples
        # Token weighting over the whole window (all ranks): every micro-loss shares one
        # denominator, summed on the device.
        counts = sum_in_order([target_tokens(b, task) for b in batches])
        window_targets = self.rank.all_reduce_sum(counts, "window targets").clamp_min(1)
        micro_losses: list[torch.Tensor] = []
        first_micro, last = state.micro_step, len(batches) - 1
        for i, batch in enumerate(batches):
            with self.rank.no_sync(parts.train_model, enabled=i < last):
                with parts.precision.autocast():
                    loss_sum = parts.step_loss(batch, task)
                loss = share = loss_sum / window_targets
                if parts.parallel.data_parallel:  # cancels DDP's (FSDP's) mean over ranks
                    loss = share * self.rank.world_size
                self.fire(Event.BACKWARD_BEGIN)
                parts.precision.backward(loss)
            self.fire(Event.BACKWARD_END)
            micro_losses.append(share)
            state.micro_step += 1
        window_loss = sum_in_order([share.detach() for share in micro_losses])
        self.rank.all_reduce_sum(window_loss, "window loss")  # every rank's share
        loop.lr = cfg.optim.lr * parts.schedule(state.step)
        set_lr(parts.optimizer, loop.lr)
        parts.precision.unscale(parts.optimizer)
        if parts.regularizers.grad_noise is not None:
            parts.regularizers.grad_noise(parts.params, state.step)
        norm = clip_grad_norm(parts.params, cfg.train.grad_clip)  # clips when grad_clip is set
        loop.pending_norms.append(norm)
        at = {"step": state.step + 1, "epoch": self.cursor.last_epoch, "micro_step": first_micro}
        skip = parts.guard.check(window_loss, norm, micro_losses, **at)  # no host sync
        self.fire(Event.OPTIMIZER_STEP_BEGIN)
        parts.precision.step(parts.optimizer, skip)
        parts.optimizer.zero_grad(set_to_none=True)
        self.fire(Event.OPTIMIZER_STEP_END)
        state.step += 1
        loop.pending_losses.append(window_loss)
        self.fire(Event.STEP_END)
        return tokens, samples

    def _log_train(self) -> None:
        """Materialize the losses since the last log: the loop's only per-interval host sync."""
        loop, state = self.loop, self.state
        losses = torch.stack(loop.pending_losses).tolist()
        loop.loss_history.extend(losses)
        loop.pending_losses.clear()
        losses = [x for x in losses if math.isfinite(x)]  # skipped steps are counted apart
        now = time.perf_counter()
        record: dict[str, Any] = {
            "step": state.step,
            "split": "train",
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": loop.lr,
            "epoch": state.epoch,
            "tokens": state.tokens_seen,
            "elapsed_s": now - self._start_time,
        }
        # loss_avg (windowed), tokens_per_s, samples_per_s, peak_mem_mb, mfu (known devices)
        assert self.meter is not None
        record.update(self.meter.log(losses, state.tokens_seen, state.samples_seen, now))
        norms = [x for x in torch.stack(loop.pending_norms).tolist() if math.isfinite(x)]
        loop.pending_norms.clear()
        record["grad_norm"] = sum(norms) / len(norms) if norms else None
        record.update(self.setup().guard.log_fields(record["grad_norm"]))  # skipped, z-score
        if self.setup().objective is not None:  # DPO: rewards/..., logps/...
            record.update(self.setup().objective.flush(self.rank))  # type: ignore[union-attr]
        by_source = getattr(self.setup().train_data, "tokens_seen", None)  # a mixture's sources
        if by_source is not None:
            record.update(by_source(self.cursor, state.epoch, state.cursor))
        state.last_train_loss = record["loss"]
        self._record(record)

    def _flush_train(self) -> bool:
        """Log the steps since the last train row of a run that ends past its log point (an
        early stop, a stop at a checkpoint); False when the review first rolled back or diverged."""
        if not (self.control.stopping and self.loop.pending_losses and self._final_wanted()):
            return True
        if self.judge.review(self.setup()) or self.judge.diverged:
            return False
        self._log_train()
        return True

    def _record(self, record: dict[str, Any]) -> None:
        """A metrics record: metrics.jsonl, status.json, then the LOG event."""
        self.run_dir.log_metrics(record)
        self.view.metrics = record
        if record["split"] == "train":
            self.view.throughput = {k: record[k] for k in THROUGHPUT_KEYS if k in record}
        self.status.metrics(record)
        self.status.write(train_state=self.state)
        self.fire(Event.LOG, metrics=record)

    def _validate(self) -> None:
        loop, state = self.loop, self.state
        self.fire(Event.VALIDATION_BEGIN)
        loop.validation_pending = True
        metrics = validate(  # and generation eval (eval.generate) when due
            self.cfg,
            self.setup(),
            self.rank,
            step=state.step,
            last=lambda: state.step >= state.total_steps or self.control.stopping,
            should_stop=self._validation_cut,
            generation=self.generation_eval,
            samples_file=self.run_dir.paths.samples_at(state.step),
        )
        if metrics is None:  # interrupted: the checkpoint records it as still to do
            return
        loop.validation_pending = False
        if not metrics:
            return
        best = self.cfg.checkpoint
        if loop.record_validation(metrics, best.metric, best.mode) and best.keep_best:
            loop.best_due = True  # the best step always gets a checkpoint
            self.control.request_save()
        self.fire(Event.VALIDATION_END, metrics=metrics)
        record = {"step": self.state.step, "split": "val", "epoch": self.state.epoch, **metrics}
        self._record({**record, "loss": metrics["val_loss"]})

    def _validation_cut(self) -> bool:
        """Whether a stop asks to cut a validation short (a pause or a prune, not an end). On
        N ranks a validation always completes: the ranks could not agree where to cut it."""
        if self.rank.distributed:
            return False
        return self.control.stopping and not self._final_wanted()

    # ---- the end of a run ---------------------------------------------------------------------

    def _finish(self) -> tuple[Path | None, str | None]:
        """final/ (the last or the best weights) and the end-of-run sample."""
        cfg, parts = self.cfg, self.setup()
        self.final_from = {"weights": "last", "step": self.state.step}
        if cfg.checkpoint.final == "best":
            self.final_from = restore_best(
                parts.model, self.checkpoints, cfg.checkpoint.metric, self.state.step
            )
        final_dir, gathered = None, None
        if parts.parallel.sharded:  # the full weights, gathered from every rank onto the main
            gathered = gather_final(parts.model, cfg, self.rank)
        if not self.judge.may_write(parts):
            return None, None
        if self.rank.is_main:
            card = model_card(cfg, self.state, final=self.run_dir.paths.final)
            final_dir = self.run_dir.save_final(
                parts.model, parts.tokenizer, cfg, card, gathered=gathered
            )
            self.fire(Event.CHECKPOINT, path=final_dir, kind="final")
        return final_dir, end_sample(cfg, parts, self.rank)

    def _summary(self, final_dir: Path | None, sample: str | None) -> dict[str, Any]:
        parts = self.setup()
        return run_summary(
            self.cfg,
            self.state,
            model=parts.model,
            device=parts.device,
            train_examples=len(parts.train_data),
            tracker=self.meter,
            wall=time.perf_counter() - self._start_time,
            final_dir=final_dir,
            sample=sample,
            stop=self.control.decided,
            final_from=self.final_from,
            resumed_from=self.resumed_from,
            checkpoints=self.checkpoint_paths,
        )
