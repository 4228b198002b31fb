"""`kiln export`: a trained model as ONNX, TorchScript or a torch.export program (pt2), gated
by parity with PyTorch (docs/export.md).

`export_model` loads final/ or a checkpoint (a LoRA adapter merged in memory), exports each
format behind one signature (`kiln.export.graph`), checks it against PyTorch at several shapes
and on greedy decoding (`kiln.export.parity`), and only then moves the whole directory into
place. `verify_export` runs the checks again from what the directory holds; `load_runner`
runs an exported file (what `kiln generate --backend onnx` decodes with).
"""

from __future__ import annotations

from kiln.export.bundle import ParityFailed, export_model, verify_export
from kiln.export.graph import FORMATS, load_runner

__all__ = ["FORMATS", "ParityFailed", "export_model", "load_runner", "verify_export"]
