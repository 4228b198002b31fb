"""The probes of benchmarks/gpu_check.py: one check per process, run by its steps.

    python benchmarks/_gpu_probes.py NAME --result OUT/results/NAME.json [--dry-run]

Runs `probe_NAME` and writes what it found to `--result` (rank 0 only under torchrun). Exit
code: 0 when it passed, 1 when it failed, gpu_check.SKIP_EXIT when it does not apply here (the
reason on stderr), 2 for an unknown probe. Unlike the driver, the probes import torch and kiln
(inside each probe, so this file imports as the driver does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_check import CUDA_INDEX_URL, ROOT, SKIP_EXIT, _tiny_gpt2

__all__ = ["Skip", "main"]


class Skip(Exception):
    """The probe does not apply here: it exits SKIP_EXIT with this reason."""


def _tokenizer() -> Any:
    from kiln.models import train_bpe_tokenizer

    lines = (ROOT / "examples" / "data" / "recipes_val.jsonl").read_text().splitlines()
    return train_bpe_tokenizer([json.loads(x)["text"] for x in lines[:60]], 320)


def _blocks(tok: Any, seq: int = 64, n: int = 96) -> Any:
    """`n` packed blocks of `seq` tokens of the validation recipes (EOS between them)."""
    import torch

    ids: list[int] = []
    for line in (ROOT / "examples" / "data" / "recipes_val.jsonl").read_text().splitlines():
        ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
        if len(ids) >= seq * n:
            break
    return torch.tensor(ids[: seq * n]).view(n, seq)


def _tiny(out: Path, dry: bool, *, model: Any = None, lora: Any = None, **train: Any) -> Any:
    """A kiln Trainer of a 2 x 64 GPT-2 (or `model`) on packed recipe blocks, 12 steps of 8
    at a constant LR of 3e-3 on `cuda` (the CPU when dry), writing into `out`."""
    from kiln import Trainer, load_config

    tok = _tokenizer()
    raw: dict[str, Any] = {
        "name": out.name,
        "output_dir": str(out),
        "seed": 0,
        "model": model or _tiny_gpt2(64),
        "data": {"train": "(in memory)", "max_length": 64, "val_split": 0.0},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"max_steps": 12, "batch_size": 8, "device": "cpu" if dry else "cuda", **train},
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 2, "progress": "none", "plots": False},
    }
    if lora:
        raw["lora"] = lora
    return Trainer(load_config(data=raw), tokenizer=tok, train_data=_blocks(tok))


def _learns(losses: list[float]) -> dict[str, float]:
    """Raise unless every loss is finite and the last three average below the first three."""
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite training loss: {losses}")
    if sum(losses[-3:]) >= sum(losses[:3]):
        raise RuntimeError(f"the loss did not fall: {[round(x, 3) for x in losses]}")
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple (2, 21, 5); an int in older torch
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def probe_env(dry: bool, work: Path) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
    }
    for dist in ("transformers", "peft", "accelerate", "bitsandbytes", "flash_attn", "triton"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            device_count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            nccl=_nccl_version(),
        )
    if shutil.which("nvidia-smi"):
        fields = "--query-gpu=name,driver_version,memory.total"
        query = ["nvidia-smi", fields, "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    try:
        import kiln.config  # noqa: F401 (pydantic: not on the lent GPU machine's python3)
    except ImportError as exc:
        info["failed"] = f"kiln does not import: {exc} (carry its wheels: benchmarks/README.md)"
    if not dry and not torch.cuda.is_available():
        info["failed"] = (
            f"CUDA is not available: torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda}); run make setup TORCH_INDEX_URL={CUDA_INDEX_URL}"
        )
    return info


def probe_smoke_bf16(dry: bool, work: Path) -> dict[str, Any]:
    import torch

    trainer = _tiny(work, dry, precision="bf16")
    out = _learns(trainer.fit().loss_history)
    weights = {str(p.dtype) for p in trainer.model.parameters()}
    if weights != {"torch.float32"} or trainer.precision.dtype is not torch.bfloat16:
        raise RuntimeError(f"bf16: autocast {trainer.precision.dtype}, weights {weights}")
    return {"device": str(trainer.device), **out}


def probe_smoke_fp16(dry: bool, work: Path) -> dict[str, Any]:
    trainer = _tiny(work, dry, precision="fp16", max_steps=20)  # the scaler skips a few
    out = _learns(trainer.fit().loss_history)
    scaler = trainer.precision.scaler
    if scaler is None:
        raise RuntimeError("train.precision fp16 trained without a GradScaler")
    scale = float(scaler.get_scale())
    if not (math.isfinite(scale) and scale > 0):
        raise RuntimeError(f"GradScaler scale {scale}")
    return {"scale": scale, **out}


def probe_smoke_fused_adamw(dry: bool, work: Path) -> dict[str, Any]:
    import torch

    trainer = _tiny(work, dry)
    trainer.setup()
    fused = [g.get("fused") for g in trainer.optimizer.param_groups]
    if not all(fused):
        raise RuntimeError(f"kiln's AdamW is not fused on {trainer.device}: {fused}")
    out = _learns(trainer.fit().loss_history)
    g = torch.Generator(device=trainer.device).manual_seed(0)
    start = torch.randn(256, 256, device=trainer.device, generator=g)
    grads = [torch.randn(256, 256, device=trainer.device, generator=g) for _ in range(5)]

    def run(**kind: bool) -> torch.Tensor:
        w = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.01, **kind)
        for grad in grads:
            w.grad = grad.clone()
            opt.step()
        return w.detach()

    diff = (run(fused=True) - run(fused=False, foreach=False)).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"fused AdamW differs from the for-loop one by {diff:.3g} (> 1e-5)")
    return {"fused_vs_unfused_max_abs_diff": diff, **out}


def probe_smoke_compile(dry: bool, work: Path) -> dict[str, Any]:
    import torch
    import torch._dynamo

    if dry:  # inductor's CPU codegen takes ~50 s cold: trace through dynamo and AOT only
        inductor = torch.nn.Module.compile

        def aot_eager(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            inductor(self, *args, backend="aot_eager", **kwargs)

        torch.nn.Module.compile = aot_eager  # type: ignore[method-assign]
    precision = "fp32" if dry else "bf16"
    start = time.perf_counter()
    eager = _tiny(work / "eager", dry, max_steps=6, precision=precision).fit().loss_history
    mid = time.perf_counter()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer = _tiny(work / "compiled", dry, max_steps=6, precision=precision, compile=True)
    compiled = trainer.fit().loss_history
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    if not graphs:
        raise RuntimeError("train.compile: torch.compile compiled no graph")
    worst = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager, strict=True))
    tol = 1e-4 if dry else 3e-2  # bf16 on the GPU: fused kernels round differently
    if worst > tol:
        raise RuntimeError(f"compiled losses differ from eager by up to {worst:.2%} (> {tol:g})")
    return {
        "backend": "aot_eager" if dry else "inductor",
        "graphs": graphs,
        "graph_breaks": breaks,
        "loss_max_rel_diff": worst,
        "eager_fit_s": mid - start,
        "compiled_fit_s": time.perf_counter() - mid,
    }


def probe_smoke_flash(dry: bool, work: Path) -> dict[str, Any]:
    import importlib.util

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    flash = [SDPBackend.FLASH_ATTENTION]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=dtype, generator=g) for _ in "qkv")
    with sdpa_kernel(flash):
        out = F.scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=True)
        out.float().square().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    diff = (out.float() - ref).abs().max().item()
    if diff > (1e-4 if dry else 3e-2):
        raise RuntimeError(f"flash attention differs from the math backend by {diff:.3g}")
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # flash allows none
    shape = {"vocab_size": 320, "n_positions": 128, "n_embd": 128, "n_layer": 2, "n_head": 2}
    config = GPT2Config(**shape, use_cache=False, **no_dropout)
    ids = torch.randint(0, 320, (2, 128), device=device, generator=g)
    detail: dict[str, Any] = {"raw_max_abs_diff": diff}
    kinds = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None and not dry:
        kinds.append("flash_attention_2")
    else:
        detail["flash_attention_2"] = "not checked (flash-attn not installed, or dry run)"
    for kind in kinds:
        model = GPT2LMHeadModel._from_config(config, attn_implementation=kind).to(device)
        with sdpa_kernel(flash), torch.autocast(device.type, torch.bfloat16, enabled=not dry):
            model(input_ids=ids, labels=ids).loss.backward()
        detail[f"hf_gpt2_{kind}"] = "ok"
    trainer = _tiny(work, dry, max_steps=4, precision="fp32" if dry else "bf16")
    with sdpa_kernel(flash):  # kiln's own step, with the flash kernel the only one allowed
        losses = trainer.fit().loss_history
    detail["kiln_step_flash_only"] = f"ok, loss {losses[-1]:.3f}"
    return detail


def probe_smoke_qlora(dry: bool, work: Path) -> dict[str, Any]:
    import importlib.util

    for need in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(need) is None:
            raise Skip(f"{need} is not installed (pip install 'kiln[qlora]')")
    from kiln.models import build_model

    base = _tiny(work / "base", dry, model={**_tiny_gpt2(64), "arch": "llama"})
    build_model(base.cfg, base.tokenizer).save_pretrained(work / "src")
    base.tokenizer.save_pretrained(work / "src")
    trainer = _tiny(
        work / "run",
        dry,
        model={"name_or_path": str(work / "src")},
        lora={"enabled": True, "qlora": True, "r": 8},
        precision="bf16",
    )
    losses = trainer.fit().loss_history
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    if not four_bit:
        raise RuntimeError("lora.qlora: no Linear4bit layer in the trained model")
    if not all(math.isfinite(x) for x in losses):  # a random base: the loss need not fall
        raise RuntimeError(f"non-finite training loss: {losses}")
    return {"linear4bit_layers": four_bit, "first_loss": losses[0], "last_loss": losses[-1]}


def probe_smoke_memory(dry: bool, work: Path) -> dict[str, Any]:
    import torch

    import kiln

    detail: dict[str, Any] = {}
    if dry:
        stats = kiln.memory_stats("cpu")
        if not (stats["peak_mb"] > 0 and stats.get("rss_mb", 1) > 0):
            raise RuntimeError(f"kiln.memory_stats('cpu'): {stats}")
        detail.update(stats)
    else:
        torch.cuda.reset_peak_memory_stats()
        before = kiln.memory_stats("cuda")["allocated_mb"]
        block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        stats = kiln.memory_stats("cuda")
        raw = torch.cuda.memory_stats()
        grew = stats["allocated_mb"] - before
        if not (grew >= 255 and stats["peak_mb"] >= stats["allocated_mb"] <= stats["reserved_mb"]):
            raise RuntimeError(f"kiln.memory_stats('cuda') after a 256 MiB tensor: {stats}")
        if raw["allocated_bytes.all.peak"] < 256 * 2**20:
            raise RuntimeError("torch.cuda.memory_stats: peak below a live 256 MiB tensor")
        del block
        free, total = torch.cuda.mem_get_info()
        detail.update(stats, free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1))
    records = _tiny(work, dry, max_steps=4).fit().records()
    peaks = [r["peak_mem_mb"] for r in records if r["split"] == "train" and "peak_mem_mb" in r]
    if not peaks or min(peaks) <= 0:
        raise RuntimeError(f"kiln logged no positive peak_mem_mb: {records}")
    detail["kiln_logged_peak_mem_mb"] = peaks[-1]
    return detail


def probe_ddp_probe(dry: bool, work: Path) -> dict[str, Any]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import GPT2Config, GPT2LMHeadModel

    backend, local = ("gloo" if dry else "nccl"), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if dry else torch.device("cuda", local)
    if not dry:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    try:
        world = dist.get_world_size()
        t = torch.full((4,), float(dist.get_rank() + 1), device=device)
        dist.all_reduce(t)
        if t.tolist() != [world * (world + 1) / 2] * 4:
            raise RuntimeError(f"all_reduce over {world} rank(s) gave {t.tolist()}")
        config = GPT2Config(
            vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=2, use_cache=False
        )
        torch.manual_seed(0)
        model = DistributedDataParallel(
            GPT2LMHeadModel(config).to(device), device_ids=None if dry else [local]
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        before = [p.detach().clone() for p in model.parameters()]
        ids = torch.randint(0, 320, (4, 64), device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=not dry):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        if not (torch.isfinite(loss) and moved):
            raise RuntimeError(f"DDP step: loss {loss.item()}, {moved} parameters moved")
        dist.barrier()
        nccl = _nccl_version() if not dry else None
        return {"backend": backend, "world_size": world, "nccl": nccl, "loss": loss.item()}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run probe NAME, write its detail to --result (rank 0): exit 0, SKIP_EXIT, 1 or 2."""
    p = argparse.ArgumentParser(prog="_gpu_probes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the probe: probe_NAME in this file")
    p.add_argument("--result", type=Path, help="where to write the probe's detail (JSON)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)
    name, result, dry = args.name, args.result, args.dry_run
    probe = globals().get(f"probe_{name}")
    if probe is None:
        print(f"gpu_check: no probe {name!r}", file=sys.stderr)
        return 2
    work = (result.parent.parent if result else Path.cwd()) / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    try:
        detail = probe(dry, work)
    except Skip as why:
        print(str(why), file=sys.stderr)
        return SKIP_EXIT
    if result is not None and os.environ.get("RANK", "0") == "0":
        result.write_text(json.dumps(detail, indent=2, default=str) + "\n")
    if "failed" in detail:  # a finding, with the detail kept for the report
        print(detail["failed"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
