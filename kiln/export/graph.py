"""The exported graph: one signature for every format, the exporters, and runners that load
an exported file and compute logits the same way for the parity checks.

Signature: `(input_ids, attention_mask) -> logits` for decoder-only models and
`(input_ids, attention_mask, decoder_input_ids) -> logits` for seq2seq, int64 inputs, float
logits `(batch, sequence, vocab)`; batch and sequence are dynamic up to the model's context.
No KV cache: a decoder recomputes the whole sequence at each step.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kiln.errors import KilnError, first_line

__all__ = ["FILES", "FORMATS", "Logits", "Runner", "export_graph", "load_runner", "pytorch_runner"]

FORMATS = ("onnx", "torchscript", "pt2")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
"""The file each format writes (ONNX keeps its weights beside it in model.onnx.data)."""

INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")
MAX_SEQUENCE = 4096
"""The dynamic sequence's upper bound for models without a position limit (T5)."""


class Logits(torch.nn.Module):
    """The model behind the fixed signature: logits only, no cache, no loss."""

    def __init__(self, model: Any, seq2seq: bool) -> None:
        super().__init__()
        self.model = model
        self.seq2seq = seq2seq

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {"decoder_input_ids": decoder_input_ids} if self.seq2seq else {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
        )
        return out.logits


class Runner(Protocol):
    """Logits from int64 arrays, whatever ran them (float32 numpy)."""

    def __call__(self, *inputs: np.ndarray) -> np.ndarray: ...


def input_names(seq2seq: bool) -> list[str]:
    return list(INPUTS if seq2seq else INPUTS[:2])


def example_inputs(seq2seq: bool, vocab: int) -> tuple[torch.Tensor, ...]:
    """What the exporters trace with: batch 2, sequence 8 (decoder 5); sizes of 0 and 1 are
    specialized by torch.export, so they are not used here."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    out = (ids, torch.ones_like(ids))
    return (*out, torch.randint(0, vocab, (2, 5), generator=gen)) if seq2seq else out


def _dynamic_shapes(seq2seq: bool, context: int | None) -> dict[str, dict[int, Any]]:
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=1024)
    seq = dim("sequence", min=1, max=context or MAX_SEQUENCE)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if seq2seq:
        shapes["decoder_input_ids"] = {
            0: batch,
            1: dim("decoder_sequence", min=1, max=context or MAX_SEQUENCE),
        }
    return shapes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' chatter (missing torchvision ops, axis renames, deprecations) off."""
    names = (
        "torch.onnx",
        "torch.export",
        "torch._export",
        "onnxscript",
        "onnx_ir",
        "torch._dynamo",
    )
    before = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)


def export_graph(
    fmt: str, module: Logits, out_dir: Path, *, vocab: int, context: int | None, opset: int
) -> Path:
    """Write `module` in format `fmt` into `out_dir`; the main file's path."""
    seq2seq = module.seq2seq
    args = example_inputs(seq2seq, vocab)
    path = out_dir / FILES[fmt]
    shapes = _dynamic_shapes(seq2seq, context)
    with _quiet(), torch.no_grad():
        if fmt == "onnx":
            _onnx()
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=input_names(seq2seq),
                output_names=["logits"],
                dynamic_shapes=shapes,
                opset_version=opset,
                external_data=True,
                verbose=False,
            )
        elif fmt == "torchscript":
            traced = torch.jit.trace(module, args, strict=False, check_trace=False)
            torch.jit.save(traced, str(path))
        elif fmt == "pt2":
            program = torch.export.export(module, args, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
        else:
            raise KilnError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return path


def opset_range() -> tuple[int, int]:
    """The ONNX opsets the installed exporter can write: from torch's lowest to the newest
    that both torch and the onnx package know (the extra missing: the one line naming it)."""
    _onnx()
    import onnx

    try:
        from torch.onnx import _constants

        low, high = _constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):  # private constants: a torch that moved them
        low, high = 7, 23
    return low, min(high, onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """`opset` if the installed exporter can write it.

    Raises:
        KilnError: naming --opset and the range.
    """
    low, high = opset_range()
    if not low <= opset <= high:
        raise KilnError(
            f"--opset: {opset} is not an opset this torch and onnx can write; "
            f"choose {low} to {high}"
        )
    return opset


def written_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file declares (its graph is not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return found[0] if found else None


def _onnx() -> Any:
    """onnxruntime, or the one-line error naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise KilnError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'kiln[export]'"
        ) from None
    return onnxruntime


def load_runner(fmt: str, directory: Path) -> Runner:
    """A runner of the exported file of format `fmt` in `directory`."""
    path = directory / FILES[fmt]
    if not path.is_file():
        why = "not a file" if path.exists() else "missing"
        raise KilnError(f"{path}: {why} (an export of format {fmt} writes it)")
    if fmt == "onnx":
        ort = _onnx()
        try:
            return _onnx_runner(ort, path)
        except Exception as exc:  # onnxruntime's own error types: a file it cannot read
            raise KilnError(
                f"{path}: onnxruntime {ort.__version__} cannot load it: {first_line(exc)[:300]}"
            ) from None
    try:
        with _quiet():
            module = _torch_module(fmt, path)
    except Exception as exc:  # a zip torch cannot read, or a program it cannot rebuild
        raise KilnError(
            f"{path}: torch {torch.__version__} cannot load it: {first_line(exc)[:300]}"
        ) from None

    def run_torch(*inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in inputs))
        return out.float().numpy()

    return run_torch


def _torch_module(fmt: str, path: Path) -> Any:
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


def _onnx_runner(ort: Any, path: Path) -> Runner:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run_onnx(*inputs: np.ndarray) -> np.ndarray:
        pairs = zip(names, inputs, strict=True)
        feed = {name: np.ascontiguousarray(x, dtype=np.int64) for name, x in pairs}
        return session.run(None, feed)[0]

    return run_onnx


def pytorch_runner(module: Logits) -> Runner:
    """The reference: the PyTorch model itself (on its own device)."""
    device = next(module.parameters()).device

    def run(*inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            tensors = [torch.from_numpy(np.asarray(x, dtype=np.int64)).to(device) for x in inputs]
            return module(*tensors).float().cpu().numpy()

    return run
