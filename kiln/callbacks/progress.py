"""Live progress: a rich bar with loss, LR and tokens/s on a TTY; plain lines elsewhere."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from kiln.callbacks.base import Callback
from kiln.engine.console import record_line, terminal

if TYPE_CHECKING:
    from kiln.engine.control import RunView

__all__ = ["ProgressCallback"]


class ProgressCallback(Callback):
    """Shows training progress.

    Modes (`log.progress`): `bar` (a rich live bar; validation results printed above it),
    `plain` (a line per log step, `step 10/40  loss 2.1  lr 3.0e-04  1,234 tok/s`, and one per
    validation), `none`, and `auto`: the bar when stderr is a TTY, else plain, so docker logs,
    nohup and CI show a line at each log step. Reads only what the loop already logged, so it
    adds no host syncs. Under `kiln train`, RUN_DIR/train.log gets the plain lines in every
    mode but `none` (the bar itself is drawn on the terminal only).
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self._progress: Any = None
        self._task: Any = None
        self._postfix = ""

    def _print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
            record_line(text)  # the bar's console draws on the terminal alone
        else:
            print(text, file=sys.stderr, flush=True)

    def on_train_begin(self, run: RunView) -> None:
        if self.mode != "bar":
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[postfix]}"),
            console=Console(file=terminal(sys.stderr)),  # its redraws stay out of train.log
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=run.state.total_steps, postfix="", completed=run.state.step
        )

    def on_step_end(self, run: RunView) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=run.state.step)

    def on_log(self, run: RunView, metrics: dict[str, Any]) -> None:
        if metrics.get("split") != "train":
            return
        loss = metrics["loss"]  # None when every step since the last log was skipped
        line = (
            f"loss {'n/a' if loss is None else f'{loss:.4f}'}  lr {metrics['lr']:.2e}  "
            f"{metrics['tokens_per_s']:,.0f} tok/s"
        )
        if metrics.get("skipped"):
            line += f"  skipped {metrics['skipped']}"
        plain = f"step {metrics['step']}/{run.state.total_steps}  {line}"
        if self._progress is not None:
            self._progress.update(self._task, postfix=line)
            record_line(plain)
        elif self.mode == "plain":
            self._print(plain)

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self.mode == "none":
            return
        from kiln.metrics.display import format_metric, generation_scores

        line = f"step {run.state.step}/{run.state.total_steps}  val_loss {metrics['val_loss']:.4f}"
        if "val_ppl" in metrics:  # token loss; preference pairs have rewards instead
            line += f"  ppl {format_metric(metrics['val_ppl'], 2)}"
        if "val_accuracy" in metrics:
            line += f"  acc {metrics['val_accuracy']:.3f}"
        if "val_rewards/accuracies" in metrics:
            line += (
                f"  reward acc {metrics['val_rewards/accuracies']:.3f}  margin "
                f"{metrics['val_rewards/margins']:.4f}"
            )
        generated = generation_scores(metrics)  # BLEU, ROUGE, recipe, a user's metrics
        self._print(f"{line}  {generated}" if generated else line)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, run: RunView) -> None:
        self._stop()

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        self._stop()
