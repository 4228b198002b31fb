"""Trainer: builds what the config describes, runs the loop, fires events, writes the run."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.callbacks.base import Callback
from kiln.callbacks.defaults import default_callbacks
from kiln.checkpoint import CheckpointManager
from kiln.config import RunConfig, config_hash
from kiln.data import (
    BatchCursor,
    build_datasets,
    load_splits,
)
from kiln.data.collate import Batcher, get_collator
from kiln.engine.datasetup import (
    as_dataset,
    build_schedule,
    input_tokens,
    tokenizer_corpus,
    total_steps,
)
from kiln.engine.evaluate import evaluate, restore_best
from kiln.engine.events import Event
from kiln.engine.generate_eval import GenerationEval
from kiln.engine.loss import count_targets, forward_loss_sum
from kiln.engine.precision import Precision, resolve_device
from kiln.engine.regularize import build_regularizers
from kiln.engine.resume import (
    check_compatible,
    checkpoint_writers,
    explain_failure,
    find_checkpoint,
    restore_checkpoint,
)
from kiln.engine.rundir import RunDir, model_card, run_summary
from kiln.engine.sample import generate_sample
from kiln.engine.signals import StopSignals
from kiln.engine.state import TrainState
from kiln.errors import DataError, KilnError
from kiln.files import is_within
from kiln.metrics.tracker import tracker_for
from kiln.models.wrap import prepare_for_training
from kiln.optim import build_optimizer, make_schedule, set_lr

__all__ = ["TrainResult", "Trainer", "seed_everything"]

log = logging.getLogger("kiln")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What `Trainer.fit()` returns."""

    run_dir: Path
    loss_history: list[float]
    """Train loss of every optimizer step (index i is step i + 1)."""
    metrics: list[dict[str, float]]
    """One row per validation: step plus val_loss, val_ppl, val_accuracy."""
    best_step: int | None
    best_metric: float | None
    final_dir: Path | None
    checkpoint_paths: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    sample: str | None = None


class Trainer:
    """Runs one training job described by a `RunConfig`.

    Pass `model`, `tokenizer`, `train_data` or `val_data` to use your own objects instead of
    building them from the config. `resume`: True (or "latest") continues from the newest
    complete checkpoint of the run directory, a path from that checkpoint; None follows
    `checkpoint.resume` (auto: resume when there is a checkpoint). Data may be a
    `TokenDataset`, a list of token-id lists, a list of example dicts (`input_ids`, optional
    `labels`) or an (N, L) tensor of token ids.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        callbacks: Sequence[Callback] = (),
        overwrite: bool = False,
        resume: str | Path | bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self._train_data = train_data
        self._val_data = val_data
        self.overwrite = overwrite
        self.resume = resume
        self.state = TrainState()
        self.run_dir = RunDir(cfg.run_dir)  # resolved: `..` and symlinks before any check
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(
            self.run_dir.path / "checkpoints",
            keep_last=ck.keep_last,
            keep_best=ck.keep_best,
            metric=ck.metric,
            mode=ck.mode,
        )
        self.checkpoint_paths: list[Path] = []
        self.resumed_from: Path | None = None
        self.callbacks: list[Callback] = list(callbacks)
        given = {type(cb) for cb in self.callbacks}
        self.callbacks += [cb for cb in default_callbacks(cfg) if type(cb) not in given]
        self.history: list[dict[str, float]] = []
        self.loss_history: list[float] = []
        self._pending_losses: list[torch.Tensor] = []
        self._pending_norms: list[torch.Tensor] = []
        self._stop_requested = False
        self._save_requested = False
        self._interrupted = False
        self._validation_pending = False
        self._setup_done = False
        # Generation eval (eval.generate): metric names are resolved here, before any work.
        self.generation_eval = GenerationEval(cfg) if cfg.eval.generate.num_samples else None
        self.final_from: dict[str, Any] | None = None  # which weights final/ holds
        self._resume_from: Path | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, **kwargs: Any) -> Trainer:
        """A trainer that builds model, tokenizer and data from `cfg`."""
        return cls(cfg, **kwargs)

    # ---- requests from callbacks -------------------------------------------------------------

    def request_stop(self, reason: str = "requested", *, resumable: bool = False) -> None:
        """Stop after the current step.

        By default training ends: a final validation runs and final/ is written. With
        `resumable=True` it pauses instead (what SIGTERM does): a checkpoint is written, and
        no validation or final/, so the run continues exactly with `--resume`.
        """
        self._stop_requested = True
        self._interrupted = self._interrupted or resumable
        if self.state.stop_reason is None:
            self.state.stop_reason = reason

    def request_save(self) -> None:
        """Ask for a checkpoint at the next step boundary."""
        self._save_requested = True

    def _on_signal(self, reason: str) -> None:
        self.request_stop(reason, resumable=True)

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from, per `resume` and `checkpoint.resume`."""
        want = self.resume
        if want is None:
            want = "auto" if self.cfg.checkpoint.resume == "auto" else False
        return find_checkpoint(want, self.checkpoints)

    # ---- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build device, data, tokenizer, model and optimizer (idempotent; `fit` calls it)."""
        if self._setup_done:
            return
        cfg = self.cfg
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = resolve_device(cfg.train.device)
        self.precision = Precision(cfg.train.precision, self.device)
        seed_everything(cfg.seed)
        try:  # a bad name fails here, before minutes of data preparation
            get_collator(cfg.data.collator, cfg.task)
        except ValueError as exc:
            raise KilnError(f"data.collator: {exc}") from None
        self.data_stats: dict[str, Any] = {}
        self._build_data_and_model()
        self.batcher = Batcher(
            cfg.task,
            self.pad_id,
            collator=cfg.data.collator,
            pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        )
        self.model = prepare_for_training(self.model, cfg, self.device, self.batcher)
        self.regularizers = build_regularizers(cfg)  # label smoothing, gradient noise
        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=cfg.optim.fused,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state.total_steps = total_steps(self.cfg, len(self.train_data), self.curriculum)
        if cfg.optim.warmup_steps >= self.state.total_steps:
            raise KilnError(
                f"optim.warmup_steps: must be < total steps ({self.state.total_steps}), "
                f"got {cfg.optim.warmup_steps}"
            )
        self.schedule = make_schedule(
            scheduler=cfg.optim.scheduler,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=self.state.total_steps,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            num_cycles=cfg.optim.num_cycles,
        )
        self._setup_done = True

    def _build_data_and_model(self) -> None:
        from kiln.models import build_model, build_tokenizer

        cfg = self.cfg
        rows = None
        self.train_rows: list[Any] | None = None  # the source rows, when built from the config
        self.val_rows: list[Any] | None = None
        if self._train_data is None:
            train_rows, val_rows, stats = load_splits(cfg)
            rows = (train_rows, val_rows, stats)
            self.train_rows, self.val_rows = train_rows, val_rows
        if self.tokenizer is None:
            texts = None
            if rows is not None:
                texts = tokenizer_corpus(cfg, rows[0])
            self.tokenizer = build_tokenizer(cfg, texts)
        if rows is not None:
            train, val, stats = build_datasets(cfg, self.tokenizer, rows[0], rows[1], stats=rows[2])
            self.train_data, self.val_data = train, val
            self.data_stats = stats.to_dict()
        else:
            self.train_data = as_dataset(self._train_data, cfg.task)
            self.val_data = None if self._val_data is None else as_dataset(self._val_data, cfg.task)
        self.curriculum, self.augmented = build_schedule(
            cfg, self.train_data, self.train_rows, self.tokenizer
        )
        if not cfg.data.isolate_documents:  # packed documents then attend across each other
            self.train_data = self.train_data.without_documents()
            if self.val_data is not None:
                self.val_data = self.val_data.without_documents()
        if len(self.train_data) < cfg.train.batch_size:
            raise DataError(
                f"data.train: {len(self.train_data)} training examples, fewer than "
                f"train.batch_size ({cfg.train.batch_size})"
            )
        if self.model is None:
            seed_everything(cfg.seed)  # weight init independent of what ran before
            self.model = build_model(cfg, self.tokenizer)
        seed_everything(cfg.seed)

    @property
    def pad_id(self) -> int:
        """Padding token id (0 when the tokenizer has none)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    # ---- the loop -----------------------------------------------------------------------------

    def fire(self, event: Event, **payload: Any) -> None:
        """Call `on_<event>` on every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, event.method)(self, **payload)

    def fit(self) -> TrainResult:
        """Train to the end (or a stop request), validate, write final/ and summary.json.

        EXCEPTION fires for any error from here on, setup included (a failure notification
        must not depend on how far the run got).
        """
        final_dir, sample = None, None
        try:
            with StopSignals(self._on_signal) as signals:
                self._begin()
                signals.arm()  # from here a signal pauses with a checkpoint
                cfg = self.cfg
                self.fire(Event.TRAIN_BEGIN)
                if self._validation_pending:  # a stop interrupted it before the checkpoint
                    self._validate()
                while self.state.step < self.state.total_steps and not self._stop_requested:
                    self._train_step()
                    self._after_step()
                if not self._interrupted:
                    self.final_from = {"weights": "last", "step": self.state.step}
                    if cfg.checkpoint.final == "best":
                        self.final_from = restore_best(self)
                    card = model_card(self)
                    final_dir = self.run_dir.save_final(self.model, self.tokenizer, cfg, card)
                    self.fire(Event.CHECKPOINT, path=final_dir)
                    sample = self._sample()
            summary = self._summary(final_dir, sample)
            self.run_dir.write_json("summary.json", summary)
            self.fire(Event.TRAIN_END)
        except BaseException as exc:
            explained = explain_failure(
                exc, self.run_dir.path, self.checkpoints, resumable=self._resume_from is not None
            )
            self.fire(Event.EXCEPTION, exc=explained)
            if explained is exc:
                raise
            raise explained from exc
        finally:
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
        )

    def _begin(self) -> None:
        """Everything before the first step: the run directory, setup, resume, the cursor."""
        self.run_dir.claim()  # checked, created and locked before minutes of setup
        resume_from = self._resume_from = self._resume_path()
        foreign = resume_from is not None and not is_within(
            resume_from, self.checkpoints.root.resolve()
        )
        if foreign:  # a checkpoint of another run: this run directory starts from it
            if is_within(resume_from, self.run_dir.path):  # type: ignore[arg-type]
                raise KilnError(
                    f"--resume: {resume_from} lies inside output_dir {self.run_dir.path} but "
                    "is not one of its checkpoints; resume that run itself"
                )
            self.run_dir.check_free(
                overwrite=self.overwrite,
                why=f", and --resume {resume_from} is a checkpoint of another run "
                f"(resume that run itself, or start this one afresh from it)",
            )
        elif resume_from is None:  # checked before minutes of setup, not after
            self.run_dir.check_free(overwrite=self.overwrite)
        self.setup()
        cfg = self.cfg
        if foreign:
            self.run_dir.prepare(cfg, overwrite=self.overwrite)
        if resume_from is not None:
            self._restore(resume_from, forked=foreign)
        else:
            self.run_dir.prepare(cfg, overwrite=self.overwrite)
        self.checkpoints.clean_incomplete()
        self.run_dir.clean_stale()
        if self.data_stats:
            self.run_dir.write_json("data_stats.json", self.data_stats)
        self._start_time = time.perf_counter()
        self.tracker = tracker_for(self)
        self.tracker.start(self.state.tokens_seen, self.state.samples_seen, self._start_time)
        self.cursor = BatchCursor(
            len(self.train_data),
            cfg.train.batch_size,
            cfg.seed,
            epoch=self.state.epoch,
            cursor=self.state.cursor,
            lengths=self._group_lengths(),
        )
        self._epoch_started = self.state.cursor > 0
        self._epochs_ended = 0

    def _after_step(self) -> None:
        """Validation and checkpoints that fall due after a step (or a stop request)."""
        cfg, step = self.cfg, self.state.step
        last = step == self.state.total_steps or self._stop_requested
        every = cfg.eval.every_steps
        due = (every and step % every == 0) or (last and not self._interrupted)
        if self.val_data is not None and due:
            self._validate()
        every = cfg.checkpoint.every_steps
        periodic = every is not None and (step % every == 0 or last)
        if periodic or self._save_requested or self._interrupted:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint of the current step (atomically) and rotate."""
        self._save_requested = False
        metrics = (
            self.history[-1] if self.history and self.history[-1]["step"] == self.state.step else {}
        )
        path = self.checkpoints.save(
            self.state.step,
            checkpoint_writers(self),
            metrics={k: v for k, v in metrics.items() if k != "step"},
            config_hash=config_hash(self.cfg),
        )
        if path not in self.checkpoint_paths:
            self.checkpoint_paths.append(path)
        self.checkpoint_paths = [p for p in self.checkpoint_paths if p.exists()]
        self.fire(Event.CHECKPOINT, path=path)
        return path

    def _restore(self, path: Path, *, forked: bool = False) -> None:
        changes = check_compatible(self, path)
        restore_checkpoint(self, path)
        self.resumed_from = path
        # Forked from another run's checkpoint: its history up to that step comes along.
        source = path.parent.parent / "metrics.jsonl" if forked else None
        self.run_dir.resume(self.cfg, self.state.step, metrics_from=source)
        log.info("resumed from %s (step %d)", path, self.state.step)
        for line in changes:
            log.info("config changed since the checkpoint: %s", line)
        self.state.total_steps = total_steps(self.cfg, len(self.train_data), self.curriculum)
        self.checkpoint_paths = [c.path for c in self.checkpoints.list()]

    def _group_lengths(self) -> torch.Tensor | None:
        """Sample lengths for `data.group_by_length` (None: plain shuffle, or equal lengths)."""
        if not self.cfg.data.group_by_length or self.train_data.blocks is not None:
            return None
        return self.train_data.lengths

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of the seeded epoch order; crosses epochs as needed."""
        epoch = self.cursor.epoch
        eligible = None
        if self.curriculum is not None:
            curriculum, step = self.curriculum, self.state.step
            eligible = lambda e: curriculum.mask(e, step)  # noqa: E731
        idx = self.cursor.next_indices(eligible)
        self._epochs_ended += self.cursor.epoch - epoch
        self.state.epoch, self.state.cursor = self.cursor.epoch, self.cursor.cursor
        data: Any = self.train_data
        if self.augmented is not None:  # re-rendered and re-tokenized per (seed, epoch, sample)
            data = self.augmented.for_epoch(self.cursor.last_epoch)
        # Packed blocks: one gather, no attention mask; position ids restart per document.
        return self.batcher(data, idx)

    def _train_step(self) -> None:
        cfg, state = self.cfg, self.state
        if not self._epoch_started:
            self._epoch_started = True
            self.fire(Event.EPOCH_BEGIN)
        self.fire(Event.STEP_BEGIN)
        batches = [self._next_batch() for _ in range(cfg.train.grad_accum_steps)]
        # Token weighting over the whole window: every micro-loss shares one denominator.
        window_targets = max(1, sum(count_targets(b, cfg.task) for b in batches))
        window_loss = torch.zeros((), device=self.device)
        for batch in batches:
            state.tokens_seen += input_tokens(batch)
            state.samples_seen += batch["input_ids"].shape[0]
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.precision.autocast():
                loss_sum, _, _ = forward_loss_sum(
                    self.model, batch, cfg.task, loss_fn=self.regularizers.loss_fn
                )
            loss = loss_sum / window_targets
            self.fire(Event.BACKWARD_BEGIN)
            self.precision.backward(loss)
            self.fire(Event.BACKWARD_END)
            window_loss += loss.detach()
            state.micro_step += 1
        self._lr = cfg.optim.lr * self.schedule(state.step)
        set_lr(self.optimizer, self._lr)
        self.precision.unscale(self.optimizer)
        if self.regularizers.grad_noise is not None:
            self.regularizers.grad_noise(self.params, state.step)
        if cfg.train.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
            self._pending_norms.append(norm.detach())
        self.fire(Event.OPTIMIZER_STEP_BEGIN)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.fire(Event.OPTIMIZER_STEP_END)
        state.step += 1
        self._pending_losses.append(window_loss)
        self.fire(Event.STEP_END)
        # A pause (resumable stop) keeps the log cadence, so a resumed run logs identically.
        last = state.step == state.total_steps or (self._stop_requested and not self._interrupted)
        if state.step % cfg.log.every_steps == 0 or last:
            self._log_train()
        for _ in range(self._epochs_ended):
            self.fire(Event.EPOCH_END)
            self._epoch_started = False
        self._epochs_ended = 0

    def _log_train(self) -> None:
        """Materialize the losses since the last log: the loop's only per-interval host sync."""
        losses = torch.stack(self._pending_losses).tolist()
        self.loss_history.extend(losses)
        self._pending_losses.clear()
        now = time.perf_counter()
        record: dict[str, Any] = {
            "step": self.state.step,
            "split": "train",
            "loss": sum(losses) / len(losses),
            "lr": self._lr,
            "epoch": self.state.epoch,
            "tokens": self.state.tokens_seen,
            "elapsed_s": now - self._start_time,
        }
        # loss_avg (windowed), tokens_per_s, samples_per_s, peak_mem_mb, mfu (known devices)
        record.update(
            self.tracker.log(losses, self.state.tokens_seen, self.state.samples_seen, now)
        )
        if self._pending_norms:
            record["grad_norm"] = torch.stack(self._pending_norms).mean().item()
            self._pending_norms.clear()
        self.state.last_train_loss = record["loss"]
        self.run_dir.log_metrics(record)
        self.fire(Event.LOG, metrics=record)

    def _validate(self) -> None:
        self.fire(Event.VALIDATION_BEGIN)
        self._validation_pending = True
        metrics = evaluate(
            self.model,
            self.val_data,
            task=self.cfg.task,
            batch_size=self.cfg.eval.batch_size or self.cfg.train.batch_size,
            pad_id=self.pad_id,
            precision=self.precision,
            batcher=self.batcher,
            max_batches=self.cfg.eval.max_batches,
            should_stop=lambda: self._interrupted,
        )
        if metrics and self._generation_due():
            generated = self.generation_eval.run(  # type: ignore[union-attr]
                self.model,
                self.tokenizer,
                self.val_rows,  # type: ignore[arg-type]
                samples_file=self.run_dir.path / "samples" / f"step-{self.state.step}.jsonl"
                if self.run_dir.enabled
                else None,
                should_stop=lambda: self._interrupted,
            )
            metrics = None if generated is None else {**metrics, **generated}
        if metrics is None:  # interrupted: the checkpoint records it as still to do
            return
        self._validation_pending = False
        if not metrics:
            return
        self.state.last_val = metrics
        self._track_best(metrics)
        self.history.append({"step": self.state.step, **metrics})
        self.fire(Event.VALIDATION_END, metrics=metrics)
        record = {"step": self.state.step, "split": "val", **metrics}
        record["loss"] = metrics["val_loss"]
        self.run_dir.log_metrics(record)
        self.fire(Event.LOG, metrics=record)

    def _track_best(self, metrics: dict[str, float]) -> None:
        name, mode = self.cfg.checkpoint.metric, self.cfg.checkpoint.mode
        value = metrics.get(name)
        if value is None:
            return
        best = self.state.best_metric
        if best is None or (value < best if mode == "min" else value > best):
            self.state.best_metric, self.state.best_step = value, self.state.step
            if self.cfg.checkpoint.keep_best:  # the best step always gets a checkpoint
                self.request_save()

    def _generation_due(self) -> bool:
        """Whether this validation includes generation eval (`eval.generate`)."""
        if self.generation_eval is None:
            return False
        if self.val_rows is None:
            if not getattr(self, "_warned_no_rows", False):
                log.warning("eval.generate: skipped, the validation data was given as tokens")
                self._warned_no_rows = True
            return False
        last = self.state.step >= self.state.total_steps or self._stop_requested
        return self.generation_eval.due(self.state.step, last=last)

    # ---- the end of a run ---------------------------------------------------------------------

    def _sample(self) -> str | None:
        prompt = self.cfg.eval.sample_prompt
        if prompt is None:
            return None
        return generate_sample(
            self.model,
            self.tokenizer,
            prompt,
            task=self.cfg.task,
            max_new_tokens=self.cfg.eval.sample_max_new_tokens,
            seed=self.cfg.seed,
        )

    def _summary(self, final_dir: Path | None, sample: str | None) -> dict[str, Any]:
        return run_summary(self, final_dir, sample, time.perf_counter() - self._start_time)
