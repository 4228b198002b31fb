"""Components that change the math of training: label smoothing and annealed gradient noise.

Each is an explicit object the trainer holds (built from the config by `build_regularizers`),
with `state_dict()` / `load_state_dict()` like every component that changes training. Both are
pure functions of their settings and of the step, so a resumed run is exact by construction:
the noise of step t is drawn from a generator seeded by (seed, t), not from a stream whose
position would have to be saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.config import RunConfig
from kiln.engine.loss import IGNORE_INDEX

__all__ = ["GradientNoise", "LabelSmoothing", "Regularizers", "build_regularizers"]

_NOISE_STREAM = 0x6E6F6973  # "nois": keeps noise seeds apart from other uses of `seed`


class LabelSmoothing:
    """Label-smoothed cross-entropy summed over target tokens (labels != -100).

    Per target token with logits z (V classes) and label y:
    (1 - eps) * (-log p_y) + eps * mean_v(-log p_v) = lse(z) - (1 - eps) z_y - eps mean(z),
    the same loss as `F.cross_entropy(label_smoothing=eps)`; padding and masked (prompt) tokens
    contribute nothing, to either term.
    """

    def __init__(self, epsilon: float) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of smoothed token losses, in fp32. logits: (N, V); labels: (N,)."""
        z = logits.float()
        mask = labels != IGNORE_INDEX
        lse = torch.logsumexp(z, dim=-1)  # (N,)
        z_y = z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (N,)
        per_token = lse - (1.0 - self.epsilon) * z_y - self.epsilon * z.mean(dim=-1)
        return torch.where(mask, per_token, 0.0).sum()

    def state_dict(self) -> dict[str, Any]:
        """Settings only: the loss has no state that evolves."""
        return {"epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (the config decides `epsilon`)."""


class GradientNoise:
    """Annealed Gaussian gradient noise (Neelakantan et al., 2015).

    At optimizer step t (0-based) every gradient gets i.i.d. N(0, eta / (1 + t)^gamma) noise,
    added after unscaling and before clipping. The noise of step t is drawn, parameter after
    parameter, from a generator seeded by (seed, t): identical on every rank and after a resume.
    """

    def __init__(self, eta: float, gamma: float = 0.55, seed: int = 0) -> None:
        if eta < 0 or gamma < 0:
            raise ValueError(f"gradient noise needs eta >= 0 and gamma >= 0, got {eta}, {gamma}")
        self.eta, self.gamma, self.seed = eta, gamma, seed

    def variance(self, step: int) -> float:
        """The noise variance at optimizer step `step` (0-based)."""
        return self.eta / (1.0 + step) ** self.gamma

    def generator(self, step: int, device: torch.device) -> torch.Generator:
        """The generator that step `step` draws from: a pure function of (seed, step)."""
        seed = np.random.SeedSequence([self.seed % 2**63, step, _NOISE_STREAM])
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
        return gen

    @torch.no_grad()
    def __call__(self, params: Iterable[torch.nn.Parameter], step: int) -> None:
        """Add the step's noise to the `.grad` of `params` (those without a gradient are skipped;
        the order of `params` must be the same every step)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or self.eta == 0.0:
            return
        std = math.sqrt(self.variance(step))
        gens: dict[torch.device, torch.Generator] = {}
        noise = []
        for g in grads:
            gen = gens.get(g.device) or gens.setdefault(g.device, self.generator(step, g.device))
            full = torch.randn(g.shape, generator=gen, device=g.device, dtype=torch.float32)
            noise.append(_like(g, full.mul_(std).to(g.dtype)))
        torch._foreach_add_(grads, noise)

    def state_dict(self) -> dict[str, Any]:
        """Settings only: the noise of a step depends on (seed, step), nothing else."""
        return {"eta": self.eta, "gamma": self.gamma, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the step counter of the trainer state is all the noise needs."""


def _like(grad: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` (the full tensor) laid out as `grad`: a sharded gradient (FSDP2, a DTensor) gets
    this rank's slice, cut locally. Every rank draws the same full noise, so a sharded run
    adds exactly the noise one process adds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(grad, DTensor):
        return noise
    return distribute_tensor(noise, grad.device_mesh, grad.placements, src_data_rank=None)


@dataclass
class Regularizers:
    """The regularizing components of a run (None: off)."""

    loss_fn: LabelSmoothing | None = None
    grad_noise: GradientNoise | None = None


def build_regularizers(cfg: RunConfig) -> Regularizers:
    """The components `cfg.train` asks for: label_smoothing and grad_noise."""
    train = cfg.train
    return Regularizers(
        loss_fn=LabelSmoothing(train.label_smoothing) if train.label_smoothing > 0 else None,
        grad_noise=(
            GradientNoise(train.grad_noise.eta, train.grad_noise.gamma, cfg.seed)
            if train.grad_noise.eta > 0
            else None
        ),
    )
