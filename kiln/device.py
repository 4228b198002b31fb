"""Device selection and mixed precision (autocast, fp16 grad scaling)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from kiln.errors import KilnError

__all__ = ["Precision", "place_model", "resolve_device", "set_tf32"]

logger = logging.getLogger("kiln")


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this node's GPU `local_rank`), then MPS, then CPU; an explicit device
    must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank) if local_rank else torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KilnError(f"train.device: {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KilnError(
                f"train.device: {name} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KilnError(f"train.device: {name} requested but MPS is not available")
    return device


class Precision:
    """Autocast and loss scaling for `train.precision` on a device.

    fp32 runs plain; bf16 autocasts matmuls to bfloat16 (weights stay fp32); fp16 autocasts to
    float16 and scales the loss (CUDA only) so small gradients do not underflow. bf16 on a CPU
    logs a warning (one line): it is usually slower than fp32 there.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if precision == "fp16" and device.type != "cuda":
            raise KilnError(f"train.precision: fp16 needs a CUDA device, training on {device.type}")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise KilnError(f"train.precision: bf16 is not supported on {name}; use fp16 or fp32")
        if precision == "bf16" and device.type == "mps":
            try:
                torch.ones(1, device=device, dtype=torch.bfloat16)
            except (RuntimeError, TypeError):
                raise KilnError(
                    "train.precision: bf16 is not supported by this MPS device; use fp32"
                ) from None
        if precision == "bf16" and device.type == "cpu":
            # Most CPUs have no bf16 matmul units: autocast converts and emulates, which
            # measured 3.5x slower than fp32 on a tiny GPT-2.
            logger.warning(
                "train.precision: bf16 on a CPU is usually much slower than fp32 (emulated "
                "without native bf16 units); set train.precision=fp32 unless you measured it"
            )
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for forward passes."""
        if self.dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, through the grad scaler when there is one."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(
        self, optimizer: torch.optim.Optimizer, skip: torch.Tensor | bool | None = None
    ) -> None:
        """Optimizer step, skipped when the device flag `skip` (a float scalar) is 1: the fused
        kernel reads it on the device (`found_inf`: weights, moments and step counts stay);
        another optimizer reads it on the host, as the fp16 grad scaler does anyway (it also
        skips, and lowers its scale for, every step whose gradients are not finite). A bool
        `skip` was judged on the host (a CPU run): a skipped step does not call the optimizer,
        which leaves the same state as the flag would."""
        if isinstance(skip, bool):
            if self.scaler is not None:
                if not skip:
                    self.scaler.step(optimizer)
                self.scaler.update()
            elif not skip:
                optimizer.step()
            return
        if self.scaler is not None:
            if skip is None or not skip.item():
                self.scaler.step(optimizer)
            self.scaler.update()
        elif skip is None:
            optimizer.step()
        elif all(group.get("fused") for group in optimizer.param_groups):
            optimizer.found_inf = skip  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
        elif not skip.item():  # one host sync per step without a fused optimizer
            optimizer.step()


def set_tf32(enabled: bool, device: torch.device) -> None:
    """`train.tf32`: let CUDA fp32 matmuls and convolutions use TF32 tensor cores (or forbid it).

    A no-op off CUDA. TF32 keeps fp32's range with a 10-bit mantissa; autocast (bf16/fp16)
    matmuls are unaffected.
    """
    if device.type != "cuda":
        return
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to `device`; a quantized (QLoRA) model was loaded onto its GPU already and
    cannot be moved."""
    if getattr(model, "hf_quantizer", None) is not None:  # PEFT forwards the attribute
        return
    model.to(device)
