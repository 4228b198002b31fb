"""`export.on_finish`: the final model exported (and checked) when training finishes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.callbacks.base import Callback
from kiln.config import ExportConfig
from kiln.errors import KilnError
from kiln.files import StorageFull
from kiln.runs import RunPaths

if TYPE_CHECKING:
    from kiln.engine.control import CheckpointKind, RunView

__all__ = ["ExportOnFinish"]

log = logging.getLogger("kiln")


class ExportOnFinish(Callback):
    """After final/ is written (main rank), `kiln export` into <run_dir>/export. A failed
    parity check or export is one logged line naming the report; the run stays finished."""

    def __init__(self, cfg: ExportConfig) -> None:
        self.cfg = cfg
        self.final: Path | None = None
        if "onnx" in cfg.formats:  # refused before training, not logged after it
            from kiln.export.graph import opset_range

            low, high = opset_range()
            if not low <= cfg.opset <= high:
                raise KilnError(
                    f"export.opset: {cfg.opset} is not an opset this torch and onnx "
                    f"can write; choose {low} to {high}"
                )

    def on_checkpoint(self, run: RunView, path: Path, kind: CheckpointKind) -> None:
        if kind == "final":
            self.final = path

    def on_train_end(self, run: RunView) -> None:
        if self.final is None or not run.rank.is_main:
            return
        from kiln.export import ParityFailed, export_model

        try:
            out = export_model(
                run.run_dir,
                self.cfg.formats,
                RunPaths(run.run_dir).export,
                opset=self.cfg.opset,
                atol=self.cfg.atol,
                overwrite=True,
            )
        except ParityFailed as exc:
            log.error("export failed parity: %s; report: %s", exc, exc.report)
        except (KilnError, StorageFull) as exc:  # the run stays finished: one line
            log.error("export: %s", str(exc).splitlines()[0])
        else:
            log.info("export: %s (%s), checked against PyTorch", out, ", ".join(self.cfg.formats))
