"""TensorBoard event files (`pip install 'kiln[tensorboard]'`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.callbacks.loggers.base import ArtifactKind, RunContext, Status
from kiln.config.tracking import TensorBoardOptions

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Scalars per step, the config as text and as HParams, and the plots as images.

    On resume the writer purges events past the checkpoint step, so the curves show each step
    once (the resumed run writes those steps again), like metrics.jsonl.
    """

    name = "tensorboard"

    def __init__(self, opts: TensorBoardOptions, ctx: RunContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(opts.log_dir) if opts.log_dir else ctx.run_dir / "tensorboard"
        self.run_id: str | None = None
        self._step = ctx.step
        purge = ctx.step + 1 if ctx.resumed else None
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        self._resumed = ctx.resumed

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._resumed:  # written by the first part of the run
            return
        from torch.utils.tensorboard.summary import hparams

        table = "\n".join(f"    {k}: {v}" for k, v in params.items())  # a markdown code block
        self._writer.add_text("config", table, 0)
        values = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()
        }
        writer = self._writer._get_file_writer()
        for summary in hparams(values, {}):
            writer.add_summary(summary)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._step = step
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)

    def log_artifact(self, path: Path, kind: ArtifactKind) -> None:
        if kind == "model":
            self._writer.add_text("final_model", str(path), self._step)
        elif kind == "plot":
            from matplotlib.image import imread

            image = imread(path)  # (H, W, C) floats in [0, 1]
            self._writer.add_image(f"plots/{path.stem}", image, self._step, dataformats="HWC")

    def close(self, status: Status) -> None:
        self._writer.close()
