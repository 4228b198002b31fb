"""Optimizer and training-loop sections."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from kiln.config.base import MAX_BATCH, MAX_COUNT, MAX_TOKENS, Section, short_repr

__all__ = [
    "DPO_METRICS",
    "AnomalyConfig",
    "DPOConfig",
    "DistributedConfig",
    "ElasticConfig",
    "GradNoiseConfig",
    "OptimConfig",
    "SpikeConfig",
    "TrainConfig",
]

# torch refuses other betas too, but only once the model and data are loaded.
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimConfig(Section):
    name: Literal["adamw"] = "adamw"
    """Optimizer (AdamW; fused when the device supports it)."""
    lr: float = Field(3e-4, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """Decoupled weight decay, applied to matrices only (not biases or norms)."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam epsilon."""
    fused: bool | None = None
    """Fused AdamW kernel: null picks the fastest supported one for the device."""
    scheduler: Literal["constant", "linear", "cosine", "cosine_restarts"] = "cosine"
    """LR schedule after warmup."""
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    """Optimizer steps of linear warmup."""
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    """Warmup as a fraction of the run's optimizer steps (ceil(ratio x steps), as HF's
    `warmup_ratio`, and at most all steps but the last), so a shorter run
    (`train.max_steps=20`) warms up in proportion; instead of warmup_steps."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the decaying schedules, as a fraction of `lr`."""
    num_cycles: int = Field(1, ge=1, le=MAX_COUNT)
    """cosine_restarts: number of cosine cycles over the run."""

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError(
                "optim.warmup_ratio: set optim.warmup_steps or optim.warmup_ratio, not both "
                f"(got {self.warmup_steps} and {self.warmup_ratio})"
            )
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        # The epsilon keeps 0.05 x 2000 at 100 (float products land a hair above). A fraction
        # never takes the whole run: a 1-step try of a config with warmup_ratio just runs.
        return min(math.ceil(self.warmup_ratio * total_steps - 1e-9), max(total_steps - 1, 0))


class GradNoiseConfig(Section):
    eta: float = Field(0.0, ge=0.0)
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015): variance eta / (1 + t)^gamma
    at optimizer step t; 0 disables it. The paper uses 0.01, 0.3 or 1.0."""
    gamma: float = Field(0.55, ge=0.0)
    """Decay exponent of the noise variance."""


class ElasticConfig(Section):
    keep: Literal["global_batch"] | None = None
    """global_batch: at a world size other than the checkpoint's (a node left or joined under
    `kiln train --nnodes MIN:MAX`, or a resume with another --nproc), each rank's share of a
    step is recomputed so that every optimizer step trains on the same samples as before;
    null: a resume at another world size must keep train.batch_size x ranks itself (else it is
    refused). `kiln train --nnodes MIN:MAX` sets global_batch."""
    global_batch: int | None = Field(None, gt=0, le=MAX_BATCH * MAX_BATCH)
    """Sequences per optimizer step at any world size (a multiple of train.grad_accum_steps);
    null: train.batch_size x train.grad_accum_steps x the world size the run first started
    at. Set it when the first start may see fewer nodes than planned, so the run's math does
    not depend on how many nodes came first."""
    vary: Literal["grad_accum_steps", "batch_size"] = "grad_accum_steps"
    """What a rank changes when its share of a step grows: grad_accum_steps keeps micro-batches
    at most train.batch_size (memory bounded; more forward/backward passes per step);
    batch_size runs its share in one micro-batch per accumulation step. Either way each global
    micro-batch, and so every sample of every step, is the same at any world size."""
    micro_batch: int | None = Field(None, gt=0, le=MAX_BATCH)
    """vary grad_accum_steps: the largest micro-batch a rank runs; null: train.batch_size as
    first given (recorded here in the run's config.yaml once a world size changes its share,
    so a later resume by hand keeps it)."""
    indivisible: Literal["wait", "stop"] = "wait"
    """A world size that does not divide the global micro-batch (global_batch /
    grad_accum_steps): wait idles the ranks, without training, until the next membership
    change restarts them (at most wait_s); stop pauses the run (exit 3, resumable)."""
    wait_s: float = Field(600.0, gt=0.0, le=7 * 24 * 3600)
    """How long `indivisible: wait` waits for a membership change before pausing (exit 3)."""


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """How N ranks (torchrun, or `kiln train --nproc N`) share the work: auto is a single
    process at world size 1 and DDP above; ddp replicates the model and all-reduces gradients;
    fsdp shards every weight, gradient and optimizer state over the ranks (FSDP2,
    `fully_shard` per transformer block); its checkpoints are DCP shards."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: auto is nccl with CUDA, else gloo."""
    timeout_s: float = Field(1800.0, gt=0.0, le=7 * 24 * 3600)
    """A collective waiting longer than this fails the run (a hung or dead rank)."""
    elastic: ElasticConfig = ElasticConfig()
    """Elastic runs: keeping the global batch when the world size changes
    (docs/distributed.md, "Elastic training")."""


class SpikeConfig(Section):
    window: int = Field(100, ge=2, le=MAX_COUNT)
    """Recent step losses the spike statistics (mean, standard deviation) are taken over;
    non-finite losses and spikes themselves are left out of them."""
    sigma: float = Field(6.0, gt=0.0)
    """A step loss more than `sigma` standard deviations above the window's mean is a spike
    (the deviation is at least 0.1% of the mean, so a flat loss does not make every rise one)."""
    warmup_steps: int = Field(20, ge=2, le=MAX_COUNT)
    """Losses in the window before spikes are judged (early losses fall fast)."""
    action: Literal["warn", "skip", "rollback"] = "warn"
    """warn: record it (anomalies.jsonl) and log a warning; skip: also skip the step's update;
    rollback: as for a non-finite step under `policy: rollback`."""


class AnomalyConfig(Section):
    policy: Literal["skip", "stop", "rollback"] = "skip"
    """A step whose loss or gradient norm is not finite never updates the weights (it is
    skipped on the device, with no host sync), and then: skip goes on; stop ends the run
    (exit 4, status diverged); rollback reloads the last complete checkpoint before it and
    leaves that step's samples out of the rest of the epoch."""
    max_consecutive: int = Field(5, ge=1, le=MAX_COUNT)
    """Non-finite steps in a row after which the run stops as diverged, whatever the policy."""
    max_rollbacks: int = Field(3, ge=0, le=MAX_COUNT)
    """rollback: rollbacks after which the next anomaly stops the run as diverged."""
    spike: SpikeConfig = SpikeConfig()
    """Loss spikes: finite, but far above the recent losses."""


DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
"""What a DPO step logs besides its loss, as TRL names them (validation: `val_` + the name)."""


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0.0, le=1e4)
    """How far the policy may move from the reference (the KL weight; TRL's `beta`)."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO (length-normalized, as TRL); hinge: SLiC's hinge loss."""


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Optimizer steps to train; with num_epochs too, whichever ends first."""
    num_epochs: float | None = Field(None, gt=0, le=1e6)
    """Passes over the training data (may be fractional). In Python, with neither this nor
    max_steps set: 1 (a YAML file run by the CLI must set one)."""
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    """Sequences per micro-batch, per rank: the global batch is batch_size x grad_accum_steps x
    the number of ranks."""
    grad_accum_steps: int = Field(1, gt=0, le=MAX_BATCH)
    """Micro-batches per optimizer step; the loss is token-weighted over the whole window."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision: fp32, bf16 (CUDA with bf16 support; on CPU, slower than fp32), fp16
    (CUDA only)."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value; null disables clipping."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), or cpu, cuda, cuda:N, mps."""
    num_threads: int | None = Field(None, gt=0, le=4096)
    """CPU threads for torch; null keeps torch's default."""
    tf32: bool = True
    """CUDA: let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer)."""
    compile: bool = False
    """torch.compile the model in place (the first steps are slow while it compiles)."""
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    """torch.compile mode: reduce-overhead uses CUDA graphs; max-autotune also tunes kernels."""
    compile_pad_multiple: int = Field(64, gt=0, le=MAX_TOKENS)
    """With compile and no data.pad_to_multiple_of: pad batch lengths up to a multiple of this,
    so compile sees a few bucketed shapes, not one per batch (packed blocks have one already).
    Set it to data.max_length for a single fixed shape."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the training loss (target tokens only; validation loss is plain)."""
    grad_noise: GradNoiseConfig = GradNoiseConfig()
    """Annealed gradient noise, seeded by (seed, step): a resumed run draws the same noise."""
    distributed: DistributedConfig = DistributedConfig()
    """Multi-process training under torchrun (see docs/distributed.md)."""
    anomaly: AnomalyConfig = AnomalyConfig()
    """Non-finite losses and gradients, and loss spikes (see docs/anomalies.md)."""
    objective: Literal["lm", "dpo"] | None = None
    """What the step minimizes: lm (token cross-entropy) or dpo (preference pairs against a
    frozen reference); null: dpo for task preference, else lm."""
    dpo: DPOConfig = DPOConfig()
    """Preference optimization (task preference; docs/post_training.md)."""

    @model_validator(mode="before")
    @classmethod
    def _one_epoch_by_default(cls, data: Any) -> Any:
        # `RunConfig()` plus a model and data is a whole run; `load_config` (the CLI) still
        # asks a file for its length.
        unset = isinstance(data, dict) and data.get("max_steps") is None
        if unset and data.get("num_epochs") is None:
            return {**data, "num_epochs": 1.0}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            got = short_repr(self.device)
            raise ValueError(f"train.device: expected auto, cpu, mps, cuda or cuda:N, got {got}")
        whole = self.distributed.elastic.global_batch
        if whole is not None and whole % self.grad_accum_steps:
            raise ValueError(
                f"train.distributed.elastic.global_batch: {whole} is not a multiple of "
                f"train.grad_accum_steps ({self.grad_accum_steps})"
            )
        return self
