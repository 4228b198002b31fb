"""Small public functions for code around kiln, or plain PyTorch loops, over what kiln already
computes: perplexity, gradient norm, memory use, kiln's LR schedule as a torch scheduler, and
loading a kiln checkpoint into your own model and optimizer.

    from kiln import load_checkpoint, lr_scheduler, perplexity

torch is imported on first call, not with `kiln`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.metrics.display import perplexity

if TYPE_CHECKING:
    import torch

    from kiln.config import RunConfig
    from kiln.config.train import OptimConfig

__all__ = ["grad_norm", "load_checkpoint", "lr_scheduler", "memory_stats", "perplexity"]


def grad_norm(
    parameters: torch.nn.Module | Iterable[torch.Tensor], norm_type: float = 2.0
) -> float:
    """The global norm of the gradients of `parameters` (a model, or parameters), over those
    that have one: what `torch.nn.utils.clip_grad_norm_` returns, without clipping."""
    import torch

    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type))


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory use in MiB: peak_mb (what kiln logs as peak_mem_mb: the CUDA allocator's peak on
    a GPU, else the process's peak RSS), rss_mb (the process's resident size now, on Linux),
    and on CUDA allocated_mb and reserved_mb."""
    import torch

    from kiln.metrics.throughput import peak_memory_mb

    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {"peak_mb": peak_memory_mb(where)}
    statm = Path("/proc/self/statm")
    if statm.is_file():
        import os

        pages = int(statm.read_text().split()[1])
        out["rss_mb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    if where.type == "cuda":
        out["allocated_mb"] = torch.cuda.memory_allocated(where) / 2**20
        out["reserved_mb"] = torch.cuda.memory_reserved(where) / 2**20
    return out


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig | RunConfig,
    total_steps: int,
    *,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """kiln's LR schedule (`optim.scheduler`, warmup, min_lr_ratio, cycles) as a torch
    `LambdaLR` over `total_steps` optimizer steps, peaking at the config's `optim.lr` (what
    the optimizer's lr is does not matter: after loading a checkpoint it is the last LR used).
    Call `scheduler.step()` after each `optimizer.step()`, as with any torch scheduler;
    `start_step`: the optimizer steps already taken (a resumed loop starts there)."""
    import torch

    from kiln.optim import schedule_for

    section = getattr(optim, "optim", optim)  # a RunConfig, or its optim section
    if total_steps < 1:
        raise KilnError(f"total_steps: must be >= 1, got {total_steps}")
    if not 0 <= start_step <= total_steps:
        raise KilnError(
            f"start_step: must be in [0, total_steps ({total_steps})], got {start_step}"
        )
    for group in optimizer.param_groups:
        group["initial_lr"] = section.lr
    schedule = schedule_for(section, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start_step - 1)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Load kiln weights into your own model (and optimizer), from a run directory (its newest
    complete checkpoint), a checkpoint (`checkpoints/step-N`, verified against its manifest
    first) or a final/ directory (weights only). The model must be built as the run built it
    (same architecture and config; for a LoRA run, the PEFT-wrapped model).

    Returns: path (the directory loaded), step (None for final/), metrics (the checkpoint's
    validation metrics, if any).

    Raises:
        KilnError: one line, naming the path: nothing to load there, a corrupt checkpoint,
            missing or unexpected weights (with `strict`).
    """
    from kiln.checkpoint import CheckpointManager
    from kiln.runs import MANIFEST, RunPaths

    path = Path(path)
    checkpoints = RunPaths(path).checkpoints
    if checkpoints.is_dir() and not (path / MANIFEST).is_file():
        latest = CheckpointManager(checkpoints).latest()
        if latest is None:
            raise KilnError(f"{path}: no complete checkpoint in {checkpoints}")
        path = latest.path
    if (path / MANIFEST).is_file():
        try:
            info = CheckpointManager(path.parent).verify(path)
        except ValueError as exc:
            raise KilnError(str(exc)) from None
        _load_checkpoint_dir(path, model, optimizer, strict=strict)
        return {"path": path, "step": info.step, "metrics": info.metrics}
    if (path / "model.safetensors").is_file() or (path / "adapter_model.safetensors").is_file():
        if optimizer is not None:
            raise KilnError(
                f"{path}: final/ holds weights only; load an optimizer from a checkpoint"
            )
        _load_final(path, model, strict=strict)
        return {"path": path, "step": None, "metrics": {}}
    raise KilnError(f"{path}: not a kiln run directory, checkpoint or final/ directory")


def _load_checkpoint_dir(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, strict: bool
) -> None:
    import torch

    from kiln.engine.resume import load_weights

    device = next(model.parameters()).device
    if strict:
        load_weights(path, model, optimizer, device=device)
        return
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if optimizer is not None:
        state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state)


def _load_final(path: Path, model: torch.nn.Module, *, strict: bool) -> None:
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = list(getattr(result, "unexpected_keys", []))
        if strict and unexpected:
            raise KilnError(f"{path}: unexpected adapter weights {unexpected[:3]}")
        return
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained writes a tied weight once (lm_head shares the embedding).
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    missing = [n for n in missing if n not in tied]
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KilnError(f"{path}: the model does not match the saved weights ({what})")
