"""How the ranks of one job share the training: one `Parallelism`, built once by `build_parts`
(`Parts.parallel`) and asked wherever the loop, validation, checkpoints and final/ differ by
strategy (torchtitan's `ParallelDims`, for the strategies kiln has).

    none   one process (world size 1)
    ddp    a full replica of the model per rank; gradients all-reduced in backward
    fsdp   the model sharded in place over a 1-D device mesh of all ranks (FSDP2): each rank
           holds 1/N of every weight, gradient and optimizer state

The rank context (`kiln.rank.RankContext`) says who this process is and runs the collectives;
this says what the ranks do with the model. `kiln.models.sharding.is_sharded(model)` stays the
question about a model object handed in from outside (`kiln.load_checkpoint`, `gather_final`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from kiln.rank import RankContext

__all__ = ["Parallelism", "Strategy"]

Strategy = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class Parallelism:
    """The ranks of the job, the strategy they train with, and the device mesh (FSDP)."""

    ranks: RankContext
    strategy: Strategy = "none"
    mesh: Any = None
    """The `DeviceMesh` the model is sharded over (fsdp: 1-D, every rank), else None."""

    @classmethod
    def build(cls, ranks: RankContext, strategy: str, device: torch.device) -> Parallelism:
        """The parallelism of `train.distributed.strategy` on `ranks`: none on one process,
        whatever the config says; fsdp, else ddp (auto) on N ranks. Under fsdp the mesh is
        made here (every rank makes it, at the same point of the setup)."""
        if not ranks.distributed:
            return cls(ranks)
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (ranks.world_size,), mesh_dim_names=("dp_shard",))
            return cls(ranks, "fsdp", mesh)
        return cls(ranks, "ddp")

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def data_parallel(self) -> bool:
        """Whether the ranks split the data (ddp or fsdp): token counts and the loss's
        denominator are summed over ranks, and the gradient reduction averages over them."""
        return self.strategy != "none"

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (fsdp): its weights and optimizer state are saved as
        per-rank DCP shards, and final/ is gathered from every rank."""
        return self.strategy == "fsdp"

    @property
    def synced(self) -> RankContext | None:
        """Who runs a model call outside training (generation, the end-of-run sample): the
        ranks, all together, when the model is sharded (each forward all-gathers its weights);
        None when the main rank runs it alone (the other ranks wait for its result)."""
        return self.ranks if self.sharded else None

    @property
    def main_writes_weights(self) -> bool:
        """Whether the main rank writes a checkpoint's weights whole (`model.safetensors`,
        the transformers and PEFT files); under fsdp every rank writes its shard instead."""
        return not self.sharded

    def wrap(self, model: Any, device: torch.device) -> Any:
        """What the training step runs: the model itself (none), its DDP wrapper (ddp), or the
        model sharded in place over the mesh (fsdp)."""
        if self.strategy == "fsdp":
            from kiln.models.sharding import shard_model

            return shard_model(model, mesh=self.mesh)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index or 0] if device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model
