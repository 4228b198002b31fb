"""FSDP2 (`train.distributed.strategy: fsdp`): the model sharded over the ranks with torch's
`fully_shard`, its checkpoints as `torch.distributed.checkpoint` (DCP) shards, and its full
state gathered for final/.

Every function here that takes a sharded model is a collective: every rank calls it, in the
same order. A checkpoint written under FSDP holds `dcp/` (every rank's shard of the trainable
weights and of the optimizer state, plus DCP's `.metadata`) instead of `model.safetensors` and
`optimizer.pt`; the other files are the same. DCP reshards on load, so such a checkpoint loads
at any world size, sharded or not (one process reads whole tensors), and a checkpoint written
without FSDP loads into a sharded model (each rank keeps its slice of the full tensors).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.rank import RankContext

__all__ = [
    "SHARDS_DIR",
    "Gathered",
    "full_tensor",
    "gather_final",
    "gather_full_state",
    "has_shards",
    "is_sharded",
    "load_full_state",
    "load_shards",
    "save_shards",
    "shard_model",
]

SHARDS_DIR = "dcp"
"""A checkpoint's DCP directory (FSDP runs)."""


def is_sharded(model: Any) -> bool:
    """Whether `model` is sharded with FSDP2 (`fully_shard`): the question about a model
    object itself (one handed in from outside a run, as `kiln.load_checkpoint` takes). Inside a
    run the engine asks its `Parallelism` (`Parts.parallel.sharded`) instead."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def has_shards(checkpoint: Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (written under FSDP)."""
    return (Path(checkpoint) / SHARDS_DIR).is_dir()


def _block_names(model: torch.nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (transformers' `_no_split_modules`: GPT2Block,
    LlamaDecoderLayer, T5Block, ...), found on the model or the one a PEFT model wraps."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: torch.nn.Module, mesh: Any = None) -> torch.nn.Module:
    """Shard `model` in place over the ranks of `mesh` (a 1-D `DeviceMesh`; None: all ranks,
    fully_shard's default): each block is its own FSDP unit (its weights are all-gathered for
    its forward and backward only, then freed), the rest goes with the root. Returns the model
    (its class becomes an `FSDPModule` subclass; parameters are DTensors)."""
    from torch.distributed.fsdp import fully_shard

    blocks = _block_names(model)
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA base) are not trained: they come back from the base model.
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: Path) -> None:
    """Write the trainable weights and the optimizer state as DCP shards into `where` (every
    rank its own file, fsynced; the coordinator writes `.metadata`). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options())
    dcp.save(
        {"model": weights, "optim": optim},
        storage_writer=FileSystemWriter(str(where), sync_files=True),
    )


def load_shards(
    where: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load DCP shards written by `save_shards` into `model` (sharded or not, at any world
    size) and, when given, `optimizer`. A key the model has and the checkpoint lacks fails
    (DCP's planner). Collective when distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=_options())}
    else:
        weights, optim = get_state_dict(model, optimizer, options=_options())
        state = {"model": weights, "optim": optim}
    with warnings.catch_warnings():  # one process reading shards whole is what is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=FileSystemReader(str(where)))
    set_model_state_dict(model, state["model"], options=_options(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options())


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
) -> tuple[list[str], list[str]]:
    """Load full (unsharded) weights and a plain `optimizer.state_dict()` (parameters by
    position) into a sharded model and its optimizer: each rank keeps its slice. Returns the
    (missing, unexpected) weight names. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = _options(full_state_dict=True, strict=False)
    keys = set_model_state_dict(model, weights, options=full)
    if optimizer is not None and optim_state is not None:
        by_fqn = _by_name(model, optimizer, optim_state)
        set_optimizer_state_dict(model, optimizer, by_fqn, options=_options(full_state_dict=True))
    return list(keys.missing_keys), list(keys.unexpected_keys)


def _by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A plain optimizer state_dict (parameter i = the i-th parameter of the param groups)
    keyed by parameter names instead, as DCP's state_dict API takes it. The optimizer is built
    the same way sharded or not, so position i is the same parameter in both."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def gather_full_state(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on the CPU of the main rank (other ranks get {}):
    all of them, or only the trainable ones (a LoRA adapter). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    state = get_model_state_dict(model, options=options)
    first: dict[int, str] = {}  # a tied weight (GPT-2's lm_head is wte) is kept once
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` as a plain tensor: a replicated DTensor (a gradient norm under FSDP) gives its value."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Gathered:
    """What final/ needs of a sharded model, gathered by every rank onto the main one."""

    state_dict: dict[str, torch.Tensor]
    """The full weights (only the adapters under LoRA); empty on the other ranks."""
    fingerprint: float | None
    """The LoRA base's fingerprint (`kiln.models.lora.base_fingerprint`), or None."""


def gather_final(model: Any, cfg: RunConfig, ranks: RankContext) -> Gathered | None:
    """The weights of a sharded model for final/ (None for a model that is not sharded: it is
    saved as it is). Collective."""
    if not is_sharded(model):
        return None
    fingerprint = None
    if cfg.lora.enabled and cfg.model.arch is not None:
        from kiln.models.lora import base_fingerprint

        fingerprint = base_fingerprint(model, ranks=ranks)
    return Gathered(gather_full_state(model, trainable_only=cfg.lora.enabled), fingerprint)
