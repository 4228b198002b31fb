"""GPU throughput: GPT-2 124M tokens/s and MFU, kiln vs HF Trainer; LoRA on a ~1B model vs
HF Trainer + PEFT.

    python benchmarks/gpu_throughput.py                 # both parts, on the GPU (H100/H200)
    python benchmarks/gpu_throughput.py --part gpt2     # GPT-2 124M only
    python benchmarks/gpu_throughput.py --dry-run       # tiny models on the CPU, end to end

Part `gpt2`: a GPT-2 124M (12 x 768, 12 heads, vocab 50304) from scratch under `kiln.Trainer`,
sequences of 1024 tokens, bf16 autocast, torch.compile, SDPA attention, fused AdamW, TF32; then
the same model (built again from its config with the same seed) under `transformers.Trainer`
on the same batches in the same order: bf16, `torch_compile`, TF32, `adamw_torch_fused`, same
LR, clipping and steps. Tokens/s is measured over the steps after `--warmup` (compilation
happens there), between two CUDA synchronizations. MFU = tokens/s x FLOPs/token / peak, with the
PaLM estimate 6N + 12·L·H·Q·T FLOPs per token (`kiln.models.model_flops_per_token`) and the
dense bf16 peak of an H100/H200 SXM, 989 TFLOP/s (`--peak-tflops` for other GPUs). Goal
(issue 33): kiln's MFU >= 50%.

Part `lora`: LoRA r=16 (alpha 32, all linear layers) on a Llama-style ~1.1B model (TinyLlama's
shape: 22 x 2048, 32 heads, 4 KV heads, MLP 5632), bf16 weights, built with a fixed seed and
saved to a temp dir, then trained from that directory by kiln and by `transformers.Trainer` +
PEFT on the same packed recipe blocks in the same order, same optimizer (fused AdamW), LR,
clipping and steps. Reports tokens/s and peak memory of each and the mean loss of the last 10
steps of each ("equal loss": within 2%). Goal: kiln >= 1.3x HF at equal loss. kiln runs with its
speed switches (`--lora-compile`, on by default); HF with its defaults plus bf16, SDPA and
fused AdamW.

Peak memory is the CUDA allocator's peak (`torch.cuda.max_memory_allocated`, reset before each
contender). On the CPU it is the process's peak RSS, which only grows: the later contender's
number includes the earlier one's.

`--dry-run` runs both parts with tiny models on the CPU in fp32 without compile, to check the
script end to end where no GPU is at hand (its numbers mean nothing). `benchmarks/gpu_check.sh`
runs both parts as two of its steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln import Callback, Trainer, load_config  # noqa: E402
from kiln.engine.control import RunView  # noqa: E402
from kiln.models import model_flops_per_token, train_bpe_tokenizer  # noqa: E402

H100_PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM
MFU_GOAL = 0.50  # GPT-2 124M, kiln, bf16 + compile (issue 33)
LORA_SPEEDUP_GOAL = 1.3  # kiln over HF Trainer + PEFT, tokens/s
EQUAL_LOSS = 0.02  # "equal loss": last-10-step means within 2% of each other


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fresh(device: str) -> None:
    """Free what the previous contender left and restart the CUDA peak-memory counter."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    """The CUDA allocator's peak since `_fresh`, else the process's peak RSS (MiB)."""
    from kiln.metrics.throughput import peak_memory_mb

    return peak_memory_mb(torch.device(device))


class _Window(Callback):
    """Times the optimizer steps after `warmup` (synchronized at both ends)."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.start: float | None = None
        self.end: float | None = None

    def on_step_end(self, run: RunView) -> None:
        step = run.state.step
        if step == self.warmup or step == run.state.total_steps:
            _sync(self.device)
            now = time.perf_counter()
            if step == self.warmup:
                self.start = now
            else:
                self.end = now


def _texts() -> list[str]:
    path = ROOT / "examples" / "data" / "recipes.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _blocks(tok: Any, texts: list[str], seq: int, n: int) -> torch.Tensor:
    """`n` packed blocks of `seq` tokens of the recipes (EOS between documents), repeated."""
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = torch.tensor(ids)
    reps = math.ceil(n * seq / len(flat))
    return flat.repeat(reps)[: n * seq].view(n, seq)


def _kiln_cfg(out: Path, args: argparse.Namespace, **sections: Any) -> Any:
    raw: dict[str, Any] = {
        "name": "bench",
        "output_dir": str(out),
        "seed": 0,
        # Every block trains, in BatchCursor's order over all of them (HF is fed that order).
        "data": {"train": "(in memory)", "max_length": sections.pop("seq"), "val_split": 0.0},
        "optim": {"lr": 3e-4, "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0},
        "log": {"every_steps": 10, "progress": "none"},
        "checkpoint": {"every_steps": None},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(data=raw)


# --- the HF Trainer contender of both parts -------------------------------------------------


def _hf_train(
    args: argparse.Namespace,
    model: Any,
    data: torch.Tensor,
    out: Path,
    *,
    batch: int,
    lr: float,
    compile: bool,
) -> dict[str, Any]:
    """Train `model` with `transformers.Trainer` on the rows of `data`, in order (kiln's order,
    given as a sequential dataset), timed as kiln is: tokens/s over the steps after the warmup,
    between two synchronizations; the losses HF logs every 10 steps (each a 10-step mean)."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.losses: list[float] = []

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (args.warmup, args.warmup + args.steps):
                _sync(args.device)
                if state.global_step == args.warmup:
                    self.start = time.perf_counter()
                else:
                    self.end = time.perf_counter()

        def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": data[i], "labels": data[i]}

    cuda = args.device.startswith("cuda")
    stamps = Stamps()
    hf_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=args.warmup + args.steps,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=not args.dry_run,
        tf32=True if cuda else None,  # as kiln's train.tf32 (HF refuses it without CUDA)
        torch_compile=compile,
        train_sampling_strategy="sequential",  # rows are already in kiln's order
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,  # as kiln: one host sync per 10 steps; each log is a 10-step mean
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        seed=0,
    )
    trainer = HFTrainer(model=model, args=hf_args, train_dataset=Rows(), callbacks=[stamps])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    tokens = args.steps * batch * data.shape[1]
    return {
        "tokens_per_s": tokens / (stamps.end - stamps.start),
        "losses": stamps.losses,
        "peak_mem_mb": _peak_mb(args.device),
    }


def _kiln_order(n: int, batch: int, steps: int) -> torch.Tensor:
    """The sample indices kiln's seeded cursor (seed 0) draws in `steps` batches."""
    from kiln.data.sampler import BatchCursor

    cursor = BatchCursor(n, batch, 0)
    return torch.cat([cursor.next_indices() for _ in range(steps)])


def _last10(losses: list[float]) -> float:
    return sum(losses[-10:]) / len(losses[-10:])


# --- part 1: GPT-2 124M, kiln vs HF Trainer --------------------------------------------------


def _gpt2(config: Any) -> Any:
    """A fresh GPT-2 from `config`, the same weights every call (seed 0)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def bench_gpt2(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import GPT2Config

    dims = (2, 64, 2, 128) if args.dry_run else (12, 768, 12, 1024)
    layers, width, heads, seq = dims
    vocab = 512 if args.dry_run else 50304
    tok = train_bpe_tokenizer(_texts()[:200], 300)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    steps = args.warmup + args.steps
    batch = args.gpt2_batch
    data = torch.randint(0, vocab, (steps * batch, seq), generator=torch.Generator().manual_seed(0))
    cfg = _kiln_cfg(
        tmp / "gpt2",
        args,
        seq=seq,
        model={
            "arch": "gpt2",
            "hidden_size": width,
            "num_layers": layers,
            "num_heads": heads,
            "max_position_embeddings": seq,
        },
        train={
            "max_steps": steps,
            "batch_size": batch,
            "precision": args.precision,
            "device": args.device,
            "compile": args.compile,
            "tf32": True,
        },
    )
    _fresh(args.device)
    model = _gpt2(config)
    params = sum(p.numel() for p in model.parameters())
    window = _Window(args.warmup, args.device)
    result = Trainer(cfg, model=model, tokenizer=tok, train_data=data, callbacks=[window]).fit()
    tokens = args.steps * batch * seq
    kiln_tok_s = tokens / (window.end - window.start)
    kiln_peak, kiln_loss = _peak_mb(args.device), _last10(result.loss_history)
    del model, result
    torch._dynamo.reset()  # HF compiles its copy from scratch too
    _fresh(args.device)
    hf = _hf_train(
        args,
        _gpt2(config),
        data[_kiln_order(len(data), batch, steps)],
        tmp / "hf-gpt2",
        batch=batch,
        lr=3e-4,
        compile=args.compile,
    )
    fpt = model_flops_per_token(config, seq)
    peak = args.peak_tflops * 1e12
    hf_loss = hf["losses"][-1]  # HF's last log: the mean of the same last 10 steps
    return {
        "params": params,
        "seq_len": seq,
        "batch": batch,
        "flops_per_token": fpt,
        "peak_tflops": args.peak_tflops,
        "kiln_tokens_per_s": kiln_tok_s,
        "kiln_mfu": kiln_tok_s * fpt / peak,
        "kiln_peak_mem_mb": kiln_peak,
        "kiln_loss_last10": kiln_loss,
        "hf_tokens_per_s": hf["tokens_per_s"],
        "hf_mfu": hf["tokens_per_s"] * fpt / peak,
        "hf_peak_mem_mb": hf["peak_mem_mb"],
        "hf_loss_last10": hf_loss,
        "speedup": kiln_tok_s / hf["tokens_per_s"],
        "loss_rel_diff": abs(kiln_loss - hf_loss) / hf_loss,
        "goal_mfu": MFU_GOAL,
    }


# --- part 2: LoRA on a ~1B Llama, kiln vs HF Trainer + PEFT --------------------------------


def _save_llama(path: Path, vocab: int, tok: Any, dry: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = (64, 176, 2, 4) if dry else (2048, 5632, 22, 32)  # width, MLP, layers, heads
    shape = dict(
        zip(
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
            sizes,
            strict=True,
        )
    )
    config = LlamaConfig(
        vocab_size=vocab,
        num_key_value_heads=max(1, shape["num_attention_heads"] // 8),
        max_position_embeddings=2048,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.float32 if dry else torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def _peft_model(args: argparse.Namespace, src: Path) -> Any:
    """HF's side: the saved base with PEFT's LoRA r=16 on every linear layer."""
    import peft
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    lcfg = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, lcfg)


def bench_lora(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    seq = 128 if args.dry_run else 1024
    tok = train_bpe_tokenizer(_texts(), 512 if args.dry_run else 8192)
    vocab = 64 * math.ceil(len(tok) / 64)
    src = tmp / "llama"
    _save_llama(src, vocab, tok, args.dry_run)
    steps = args.warmup + args.steps
    blocks = _blocks(tok, _texts(), seq, steps * args.lora_batch)

    cfg = _kiln_cfg(
        tmp / "kiln-lora",
        args,
        seq=seq,
        model={
            "name_or_path": str(src),
            "dtype": "float32" if args.dry_run else "bfloat16",
            "attn_implementation": "sdpa",
        },
        lora={"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0},
        optim={"lr": args.lora_lr},
        train={
            "max_steps": steps,
            "batch_size": args.lora_batch,
            "precision": args.precision,
            "device": args.device,
            "compile": args.compile and args.lora_compile,
        },
        log={"every_steps": 10},
    )
    _fresh(args.device)
    window = _Window(args.warmup, args.device)
    result = Trainer(cfg, tokenizer=tok, train_data=blocks, callbacks=[window]).fit()
    kiln_tok_s = args.steps * args.lora_batch * seq / (window.end - window.start)
    kiln_peak, kiln_loss = _peak_mb(args.device), _last10(result.loss_history)
    del result
    torch._dynamo.reset()
    _fresh(args.device)
    # kiln's seeded order, given to HF as a sequential dataset: both see the same batches.
    order = _kiln_order(len(blocks), args.lora_batch, steps)
    hf = _hf_train(
        args,
        _peft_model(args, src),
        blocks[order],
        tmp / "hf-lora",
        batch=args.lora_batch,
        lr=args.lora_lr,
        compile=False,  # HF + PEFT as people run it: its defaults
    )
    hf_loss = hf["losses"][-1]  # HF's last log: the mean of the same last 10 steps
    return {
        "seq_len": seq,
        "batch": args.lora_batch,
        "kiln_tokens_per_s": kiln_tok_s,
        "kiln_peak_mem_mb": kiln_peak,
        "kiln_loss_last10": kiln_loss,
        "hf_tokens_per_s": hf["tokens_per_s"],
        "hf_peak_mem_mb": hf["peak_mem_mb"],
        "hf_loss_last10": hf_loss,
        "speedup": kiln_tok_s / hf["tokens_per_s"],
        "loss_rel_diff": abs(kiln_loss - hf_loss) / hf_loss,
        "goal_speedup": LORA_SPEEDUP_GOAL,
        "equal_loss_within": EQUAL_LOSS,
    }


def _say_gpt2(g: dict[str, Any]) -> None:
    print(
        f"gpt2 {g['params'] / 1e6:.1f}M seq {g['seq_len']} batch {g['batch']}, "
        f"{g['flops_per_token'] / 1e9:.3f} GFLOP/token, peak {g['peak_tflops']:g} TFLOP/s: "
        f"kiln {g['kiln_tokens_per_s']:,.0f} tok/s MFU {100 * g['kiln_mfu']:.1f}% "
        f"(goal >= {100 * MFU_GOAL:.0f}%), {g['kiln_peak_mem_mb']:,.0f} MiB; hf "
        f"{g['hf_tokens_per_s']:,.0f} tok/s MFU {100 * g['hf_mfu']:.1f}%, "
        f"{g['hf_peak_mem_mb']:,.0f} MiB; kiln/hf {g['speedup']:.2f}x; loss over the last "
        f"10 steps kiln {g['kiln_loss_last10']:.4f} vs hf {g['hf_loss_last10']:.4f}"
    )


def _say_lora(r: dict[str, Any]) -> None:
    print(
        f"lora r=16 seq {r['seq_len']} batch {r['batch']}: kiln "
        f"{r['kiln_tokens_per_s']:,.0f} tok/s {r['kiln_peak_mem_mb']:,.0f} MiB, hf+peft "
        f"{r['hf_tokens_per_s']:,.0f} tok/s {r['hf_peak_mem_mb']:,.0f} MiB, "
        f"{r['speedup']:.2f}x (goal >= {LORA_SPEEDUP_GOAL}x); loss over the last 10 steps kiln "
        f"{r['kiln_loss_last10']:.4f} vs hf {r['hf_loss_last10']:.4f} "
        f"({100 * r['loss_rel_diff']:.2f}% apart)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "gpt2", "lora"], default="all")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, fp32")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50; dry 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10; dry 7)")
    p.add_argument("--gpt2-batch", type=int, default=16, help="GPT-2 sequences per step (16)")
    p.add_argument("--lora-batch", type=int, default=8, help="LoRA sequences per step (8)")
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-lora-compile", dest="lora_compile", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.precision, args.compile = "cpu", "fp32", False
        args.gpt2_batch, args.lora_batch = min(args.gpt2_batch, 4), min(args.lora_batch, 4)
        args.steps = args.steps or 3
        args.warmup = args.warmup or 7  # 10 steps in all: one 10-step loss mean to compare
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --dry-run)")
        args.device, args.precision = "cuda", "bf16"
        args.steps, args.warmup = args.steps or 50, args.warmup or 10
        name = torch.cuda.get_device_name()
        if not any(x in name for x in ("H100", "H200")) and args.peak_tflops == H100_PEAK_TFLOPS:
            print(f"warning: {name}: MFU below assumes a 989 TFLOP/s peak (--peak-tflops)")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device}  torch {torch.__version__}  dry_run={args.dry_run}")
    results: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
    }
    parts = [("gpt2", bench_gpt2, _say_gpt2), ("lora", bench_lora, _say_lora)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, bench, say in parts:
            if args.part not in ("all", name):
                continue
            results[name] = bench(args, Path(tmp))
            say(results[name])
            if args.json:  # after each part: a later crash keeps the earlier numbers
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
