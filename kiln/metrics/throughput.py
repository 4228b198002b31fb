"""ThroughputMeter: what the train records of metrics.jsonl and summary.json report beyond the
loss: a windowed loss average, throughput, peak memory and MFU.

The trainer calls `log(...)` on logging steps only (the loop's one host sync), so tracking
costs nothing on other steps.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PEAK_FLOPS", "ThroughputMeter", "meter_for", "peak_flops", "peak_memory_mb"]

# Dense bf16/fp16 tensor-core peak FLOP/s (no sparsity), by a substring of the CUDA device
# name; fp32 runs use the TF32 figure. Extend it, or set KILN_PEAK_FLOPS, for other devices.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 83e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 65e12, "fp32": 8.1e12},
}


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of `device` at `precision`, or None when unknown (then no MFU is reported).

    The environment variable KILN_PEAK_FLOPS (a number, e.g. 312e12) overrides the table.
    """
    env = os.environ.get("KILN_PEAK_FLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise ValueError(f"KILN_PEAK_FLOPS: expected a number, got {env!r}") from None
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    kind = "fp32" if precision == "fp32" else "bf16"
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[kind]
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far, MiB: CUDA memory allocated by torch on a GPU, else the process's
    peak resident set size (ru_maxrss)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


class ThroughputMeter:
    """Turns the counters at each logging step into rates and averages.

    Args:
        device: where training runs (for peak memory and peak FLOP/s).
        flops_per_token: training FLOPs per token (`kiln.models.model_flops_per_token`), or
            None to skip MFU.
        peak: the device's peak FLOP/s, or None to skip MFU (default: `peak_flops(device)`).
        window: steps averaged by `loss_avg` (the last `window` finite step losses; a
            resumed or rolled-back run restarts it from its loss history: `seed_window`).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        flops_per_token: float | None = None,
        peak: float | None = None,
        window: int = 100,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.window = window
        self._losses: deque[float] = deque(maxlen=window)
        self._last: tuple[float, int, int] | None = None
        self._start: tuple[float, int, int] | None = None
        self._mfu: list[float] = []

    def start(self, tokens: int, samples: int, now: float | None = None) -> None:
        """Mark the start of timing (the counters may be non-zero after a resume)."""
        now = time.perf_counter() if now is None else now
        self._start = self._last = (now, tokens, samples)

    def seed_window(self, history: Sequence[float]) -> None:
        """Restart the `loss_avg` window from the run's loss history (one loss per step so
        far, as the checkpoint keeps it): after a resume the average goes on as if the run
        had never stopped, and after a rollback the steps run again count once."""
        tail: list[float] = []
        for loss in reversed(history):  # the last `window` finite losses, as `log` keeps them
            if len(tail) == self.window:
                break
            if math.isfinite(loss):
                tail.append(loss)
        self._losses.clear()
        self._losses.extend(reversed(tail))

    def log(
        self,
        losses: Sequence[float],
        tokens: int,
        samples: int,
        now: float | None = None,
    ) -> dict[str, float]:
        """Metrics for the steps since the last call.

        Args:
            losses: train loss of every step since the last call.
            tokens: tokens seen so far (all steps).
            samples: samples seen so far.
            now: `time.perf_counter()` (default: now).

        Returns:
            loss_avg (mean loss of the last `window` steps), tokens_per_s, samples_per_s
            (since the last call), peak_mem_mb, and mfu when FLOPs and peak are known.
        """
        now = time.perf_counter() if now is None else now
        if self._last is None:
            self.start(tokens, samples, now)
        assert self._last is not None
        since, tokens_then, samples_then = self._last
        self._last = (now, tokens, samples)
        self._losses.extend(losses)
        dt = max(now - since, 1e-9)
        record = {
            "loss_avg": sum(self._losses) / max(len(self._losses), 1),
            "tokens_per_s": (tokens - tokens_then) / dt,
            "samples_per_s": (samples - samples_then) / dt,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        mfu = self._mfu_of(record["tokens_per_s"])
        if mfu is not None:
            record["mfu"] = mfu
            self._mfu.append(mfu)
        return record

    def _mfu_of(self, tokens_per_s: float) -> float | None:
        if not self.flops_per_token or not self.peak:
            return None
        return tokens_per_s * self.flops_per_token / self.peak

    def summary(
        self, tokens: int, samples: int, now: float | None = None, *, wall: float | None = None
    ) -> dict[str, Any]:
        """Whole-run figures for summary.json: tokens_per_s, samples_per_s (what this process
        trained since `start`, over its time since then: a resumed run's rate is that of its
        resumed part, never the earlier parts' tokens over this part's time), peak_memory_mb,
        mfu (or None). `wall`: the seconds since `start` (default: until `now`), so the
        rates divide by the wall time summary.json reports."""
        now = time.perf_counter() if now is None else now
        out: dict[str, Any] = {"peak_memory_mb": peak_memory_mb(self.device)}
        if self._start is not None:
            since, tokens_then, samples_then = self._start
            dt = max(now - since if wall is None else wall, 1e-9)
            out["tokens_per_s"] = (tokens - tokens_then) / dt
            out["samples_per_s"] = (samples - samples_then) / dt
            out["mfu"] = self._mfu_of((tokens - tokens_then) / dt)
        return out


def meter_for(cfg: Any, model: Any, device: torch.device) -> ThroughputMeter:
    """The meter of a run: MFU only where the device's peak FLOP/s is known."""
    peak = peak_flops(device, cfg.train.precision)
    flops = None
    if peak:
        from kiln.models import model_flops_per_token

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        flops = model_flops_per_token(base, cfg.data.max_length)
    return ThroughputMeter(device, flops_per_token=flops, peak=peak)
