"""Divergence: non-finite losses and gradients, and loss spikes (`train.anomaly`).

Per step, on the device and with no host sync (`AnomalyGuard.check`), the window loss and the
gradient norm are tested for finiteness, and the loss against the mean and standard deviation
of the recent losses (a ring buffer on the device) for a spike. A step that must not update the
weights gets a skip flag that the fused AdamW kernel reads (`found_inf`: the weights, the
moments and the step count stay as they were; an optimizer without that input reads the flag
on the host, one sync per step). On the CPU, where reading a value costs no sync, the same rule
is judged on the host in Python floats (a tenth of the cost of ~40 tiny tensor ops a step),
and a skipped step does not call the optimizer.

The flags are read on the host at the next logging step, and before any checkpoint or final/
(`review`, one sync). There the policy acts: every anomaly is recorded (anomalies.jsonl: step,
micro-step, kind, value, action, the batch's sample indices and source rows), and the run goes
on, stops as diverged (exit 4), or rolls back to the last complete checkpoint before the
anomaly with the anomalous steps' samples left out of the rest of their epoch.

Under DDP/FSDP the window loss is all-reduced and the gradients are reduced before the norm is
taken, so a NaN on one rank is a NaN on every rank: the ranks flag and skip the same steps.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kiln.config.train import AnomalyConfig
    from kiln.rank import RankContext

__all__ = ["AnomalyGuard", "Verdict", "clip_grad_norm", "finite_state"]

log = logging.getLogger("kiln")

_ROW = ("loss", "norm", "z", "spike", "skip")  # what `check` keeps per step, on the device
_NORM_WINDOW = 100  # logged gradient norms the grad_norm_z statistics are taken over
_WHAT = {
    "nan_loss": "a nan loss",
    "inf_loss": "an inf loss",
    "nan_grad": "a nan gradient norm",
    "inf_grad": "an inf gradient norm",
}


def clip_grad_norm(params: Sequence[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The total gradient norm before clipping (a plain tensor on the device, also for sharded
    gradients); the gradients are clipped to `clip` in place when given. (The loop's step; the
    public `kiln.grad_norm` measures a model's gradients as a float and clips nothing.)"""
    from kiln.models.sharding import full_tensor

    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return full_tensor(norm).detach()


@dataclass
class _Step:
    """Host-side facts of a step whose flags are still on the device."""

    step: int
    epoch: int
    micro_step: int
    """Micro-batches done before this step's first one."""
    drawn: list[torch.Tensor]
    """This rank's sample indices, micro-batch after micro-batch (host tensors)."""

    @property
    def samples(self) -> list[int]:
        return torch.cat(self.drawn).tolist() if self.drawn else []


class Verdict(NamedTuple):
    """What the trainer must do after a review (besides recording)."""

    action: str
    """stop or rollback."""
    step: int
    """The step that decided it (rollback: the first anomalous step)."""
    reason: str


def _value(x: float) -> float | str:
    """A JSON-safe value: non-finite ones as "nan", "inf", "-inf"."""
    return x if math.isfinite(x) else str(x)


class AnomalyGuard:
    """Flags anomalous steps on the device, reviews them on the host (see the module doc).

    State (checkpointed, so a resumed run judges as the uninterrupted one): the spike window,
    the count of non-finite steps in a row, rollbacks, the samples left out of epochs, and the
    recent logged gradient norms.
    """

    def __init__(self, cfg: AnomalyConfig, device: torch.device) -> None:
        self.cfg = cfg
        window = cfg.spike.window
        self._losses = torch.zeros(window, device=device)
        self._kept = torch.zeros((), dtype=torch.int64, device=device)  # losses ever kept
        self._slots = torch.arange(window, device=device)
        self._skip_spikes = cfg.spike.action != "warn"
        self._host = device.type == "cpu"
        """On the CPU reading a value costs no sync, and judging in Python floats costs a tenth
        of the ~40 tiny tensor ops (`_check_on_host`): the window is then `_window`, the
        count `_count` (the same float32 values as the device's buffer would hold)."""
        self._window = [0.0] * window
        self._count = 0
        self._rows: list[Any] = []
        """Per step: (loss, norm, z, spike, skip), a tensor on the device or a host list."""
        self._micro: list[Any] = []
        self._steps: list[_Step] = []
        self._drawn: list[torch.Tensor] = []
        self.consecutive = 0
        """Non-finite steps in a row, up to the last review."""
        self.rollbacks = 0
        self.skipped = 0
        """Steps skipped since the last logging step."""
        self.excluded: dict[int, list[int]] = {}
        """Epoch -> sample indices not drawn again in it (rollback)."""
        self.norms: list[float] = []
        """Recent logged gradient norms (grad_norm_z)."""

    # ---- on the device, every step --------------------------------------------------------

    def drew(self, indices: torch.Tensor) -> None:
        """Note the sample indices of a micro-batch of the step being assembled (host)."""
        self._drawn.append(indices)

    def check(
        self,
        loss: torch.Tensor,
        norm: torch.Tensor,
        micro_losses: Sequence[torch.Tensor],
        *,
        step: int,
        epoch: int,
        micro_step: int,
    ) -> torch.Tensor | bool:
        """Flag the window that ends step `step` (its loss, its gradient norm, and its
        micro-batches' losses); returns the skip flag (a float32 scalar on the device, 1.0:
        do not update; no host sync). On the CPU the flag is a bool judged on the host."""
        if self._host:
            return self._check_on_host(loss, norm, micro_losses, step, epoch, micro_step)
        spike_cfg = self.cfg.spike
        loss32 = loss.detach().float()
        finite_loss = torch.isfinite(loss32)
        finite = finite_loss & torch.isfinite(norm)
        n = self._kept.clamp(max=len(self._losses))
        valid = self._slots < n
        count = n.clamp(min=1).float()
        mean = torch.where(valid, self._losses, 0.0).sum() / count
        var = torch.where(valid, (self._losses - mean).square(), 0.0).sum() / count
        z = (loss32 - mean) / var.sqrt().clamp_min(mean.abs() * 1e-3 + 1e-12)
        spike = finite_loss & (n >= spike_cfg.warmup_steps) & (z > spike_cfg.sigma)
        skip = ~finite | spike if self._skip_spikes else ~finite
        keep = finite_loss & ~spike  # the statistics ignore non-finite losses and spikes
        slot = (self._kept % len(self._losses)).view(1)
        self._losses.index_copy_(0, slot, torch.where(keep, loss32, self._losses[slot]))
        self._kept += keep
        self._rows.append(torch.stack([loss32, norm.float(), z, spike.float(), skip.float()]))
        self._micro.append(torch.stack([x.detach().float() for x in micro_losses]))
        self._steps.append(_Step(step, epoch, micro_step, self._drawn))  # read at a review
        self._drawn = []
        return skip.float()

    def _check_on_host(
        self,
        loss: torch.Tensor,
        norm: torch.Tensor,
        micro_losses: Sequence[torch.Tensor],
        step: int,
        epoch: int,
        micro_step: int,
    ) -> bool:
        """`check` on the CPU: the same rule, the window's statistics in float64 on the host
        (the window, the checkpointed state, holds the same float32 values as on a device)."""
        spike_cfg = self.cfg.spike
        loss32, norm_f = float(loss), float(norm)  # float32 (or bf16) values, exactly
        finite_loss = math.isfinite(loss32)
        finite = finite_loss and math.isfinite(norm_f)
        window = len(self._window)
        n = min(self._count, window)
        values = self._window[:n]  # the first n slots hold them
        mean = sum(values) / n if n else 0.0
        deviations = [v - mean for v in values]
        std = math.sqrt(sum(map(operator.mul, deviations, deviations)) / n) if n else 0.0
        z = (loss32 - mean) / max(std, abs(mean) * 1e-3 + 1e-12)
        spike = finite_loss and n >= spike_cfg.warmup_steps and z > spike_cfg.sigma
        skip = not finite or (spike and self._skip_spikes)
        if finite_loss and not spike:  # the statistics ignore non-finite losses and spikes
            self._window[self._count % window] = loss32
            self._count += 1
        self._rows.append([loss32, norm_f, z, float(spike), float(skip)])
        one = len(micro_losses) == 1  # the window's loss is its only micro-batch's
        self._micro.append([loss32] if one else [float(x.detach()) for x in micro_losses])
        self._steps.append(_Step(step, epoch, micro_step, self._drawn))
        self._drawn = []
        return skip

    # ---- on the host, at a review ---------------------------------------------------------

    def review(
        self, rank: RankContext, sources: Callable[[list[int]], list[str] | None]
    ) -> tuple[list[dict[str, Any]], Verdict | None]:
        """Read the pending flags (one host sync) and judge them: the anomaly records for
        anomalies.jsonl, and what the run must do (None: go on). Every rank returns the same
        (the flags agree; the records' samples are gathered from all ranks). `sources`: sample
        indices -> their source rows' file:line, or None."""
        if not self._rows:
            return [], None
        if self._host:  # judged there already
            rows, micro = self._rows, self._micro
        else:
            rows, micro = torch.stack(self._rows).tolist(), torch.stack(self._micro).tolist()
        steps, self._rows, self._micro, self._steps = self._steps, [], [], []
        flagged = [i for i, r in enumerate(rows) if r[3] or not _finite(r)]
        if not flagged:
            self.consecutive = 0
            return [], None
        mine = [(steps[i].samples, _first_bad(micro[i])) for i in flagged]
        every = rank.all_gather(mine, "anomaly records")  # only when something was flagged
        records: list[dict[str, Any]] = []
        verdict = None
        for i, values in enumerate(rows):
            if i not in flagged:
                self.consecutive = 0
                continue
            row = dict(zip(_ROW, values, strict=True))
            k = flagged.index(i)
            record = self._judge(row, steps[i], [r[k] for r in every], sources)
            if verdict is None:
                verdict = self._verdict(record, row)
            records.append(record)
            if verdict is not None and verdict.action == "rollback":
                break  # the steps after it are trained again
        return records, verdict

    def _judge(
        self,
        row: dict[str, float],
        at: _Step,
        ranks: list[tuple[list[int], int | None]],
        sources: Callable[[list[int]], list[str] | None],
    ) -> dict[str, Any]:
        samples = [s for r in ranks for s in r[0]]
        bad_micro = next((m for _, m in ranks if m is not None), None)
        if _finite(row):
            kind, value, action = "spike", row["loss"], self.cfg.spike.action
            self.consecutive = 0
        else:
            which = "loss" if not math.isfinite(row["loss"]) else "grad"
            value = row[which if which == "loss" else "norm"]
            kind = f"{'nan' if math.isnan(value) else 'inf'}_{which}"
            action = self.cfg.policy
            self.consecutive += 1
        if row["skip"]:
            self.skipped += 1
        return {
            "step": at.step,
            "micro_step": None if bad_micro is None else at.micro_step + bad_micro + 1,
            "epoch": at.epoch,
            "kind": kind,
            "value": _value(value),
            "z": _value(row["z"]) if kind == "spike" else None,
            "action": action,
            "to_step": None,
            "samples": samples,
            "sources": sources(samples),
        }

    def _verdict(self, record: dict[str, Any], row: dict[str, float]) -> Verdict | None:
        step, kind, n = record["step"], record["kind"], self.consecutive
        what = _WHAT.get(kind) or f"a loss spike to {row['loss']:.4g} (z {row['z']:.1f})"
        if kind != "spike" and n >= self.cfg.max_consecutive:
            return Verdict(
                "stop",
                step,
                f"diverged at step {step}: {n} non-finite steps in a row (steps "
                f"{step - n + 1}-{step}), the last with {what} "
                f"(train.anomaly.max_consecutive {self.cfg.max_consecutive})",
            )
        if record["action"] == "stop":
            reason = f"diverged at step {step}: {what} (train.anomaly.policy stop)"
            return Verdict("stop", step, reason)
        if record["action"] != "rollback":
            return None
        if self.rollbacks >= self.cfg.max_rollbacks:
            return Verdict(
                "stop",
                step,
                f"diverged at step {step}: {what} after {self.rollbacks} rollbacks "
                f"(train.anomaly.max_rollbacks {self.cfg.max_rollbacks})",
            )
        return Verdict("rollback", step, f"step {step}: {what}")

    def exclude(self, records: list[dict[str, Any]]) -> None:
        """Leave the samples of these anomalies out of the rest of their epochs (rollback)."""
        for record in records:
            kept = self.excluded.setdefault(record["epoch"], [])
            kept.extend(s for s in record["samples"] if s not in kept)
        self.rollbacks += 1
        self.consecutive = 0

    def mask(self, epoch: int, n: int) -> torch.Tensor | None:
        """(n,) bool: the samples of `epoch` that may be drawn; None when all may."""
        left_out = self.excluded.get(epoch)
        if not left_out:
            return None
        mask = torch.ones(n, dtype=torch.bool)
        mask[torch.tensor(left_out, dtype=torch.long)] = False
        return mask

    def log_fields(self, norm: float | None) -> dict[str, float]:
        """Fields of a train log record: `skipped` (steps skipped since the last one) and
        `grad_norm_z` (the window's mean gradient norm against the recent logged ones)."""
        out: dict[str, float] = {}
        if self.skipped:
            out["skipped"] = self.skipped
        self.skipped = 0
        if norm is None or not math.isfinite(norm):
            return out
        if len(self.norms) >= 2:
            mean = sum(self.norms) / len(self.norms)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.norms) / len(self.norms))
            out["grad_norm_z"] = (norm - mean) / max(std, abs(mean) * 1e-3, 1e-12)
        self.norms = [*self.norms, norm][-_NORM_WINDOW:]
        return out

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The judging state (no pending flags: a review runs before every checkpoint)."""
        return {
            "losses": list(self._window) if self._host else self._losses.tolist(),
            "kept": self._count if self._host else int(self._kept),
            "consecutive": self.consecutive,
            "rollbacks": self.rollbacks,
            "skipped": self.skipped,
            "excluded": {str(k): v for k, v in self.excluded.items()},
            "norms": list(self.norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        losses = torch.tensor(state["losses"], dtype=torch.float32)
        if losses.shape == self._losses.shape:  # a changed window starts afresh
            self._losses.copy_(losses)
            self._kept.fill_(int(state["kept"]))
            self._window, self._count = losses.tolist(), int(state["kept"])
        self.consecutive = int(state["consecutive"])
        self.rollbacks = int(state["rollbacks"])
        self.skipped = int(state.get("skipped", 0))
        self.excluded = {int(k): list(v) for k, v in state["excluded"].items()}
        self.norms = [float(x) for x in state["norms"]]


def _finite(row: Sequence[float] | dict[str, float]) -> bool:
    loss, norm = (row["loss"], row["norm"]) if isinstance(row, dict) else row[:2]
    return math.isfinite(loss) and math.isfinite(norm)


def _first_bad(micro: list[float]) -> int | None:
    """Index of the first micro-batch whose loss is not finite, or None."""
    return next((i for i, x in enumerate(micro) if not math.isfinite(x)), None)


def finite_state(parts: Any, rank: RankContext, diverge: Callable[[str], None]) -> bool:
    """Whether the weights and the optimizer state are all finite (each rank checks its own
    shards; one host sync). When not, `diverge(reason)` is called: nothing non-finite is ever
    written (a checkpoint, final/)."""
    from torch.distributed.tensor import DTensor

    state = parts.optimizer.state.values()
    tensors = [*parts.params, *(v for s in state for v in s.values() if torch.is_tensor(v))]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    local = [t for t in local if t.is_floating_point() and t.numel()]
    if not local:
        return True
    bad = torch.stack([(~torch.isfinite(t)).any() for t in local]).sum()
    bad = rank.all_reduce_sum(bad, "non-finite weights check")
    if not int(bad):
        return True
    diverge(
        f"{int(bad)} tensors of the weights or optimizer state hold non-finite values; "
        "they are not written"
    )
    return False
