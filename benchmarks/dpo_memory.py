"""Peak memory of DPO: a frozen copy as the reference (full fine-tuning) against LoRA, whose
reference is the policy with its adapters disabled (no second copy of the weights).

    .venv/bin/python benchmarks/dpo_memory.py [--width 768 --layers 8]

Builds a GPT-2 (random weights, saved to a temp dir), writes preference pairs, and runs each
contender as its own `kiln train` process for a few steps, reading the process's peak RSS
(`ru_maxrss` of the finished child). Contenders, same model, pairs and batch:

- `dpo-full`: task preference, full fine-tuning: policy + frozen copy + AdamW's two moments;
- `dpo-lora`: task preference with LoRA r=8: one copy of the base weights;
- `sft-lora`: task instruction with LoRA on the same prompts and chosen completions, twice the
  batch (a DPO batch of B pairs runs 2B sequences): what LoRA training of this model and these
  tokens costs without DPO.

What to read: dpo-lora minus sft-lora is DPO's own cost (a no-grad reference forward, the
log-probabilities), far below one model copy; dpo-full minus dpo-lora is at least the copy and
the optimizer state of full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, width: int, layers: int) -> tuple[Path, int]:
    """A GPT-2 and a tokenizer saved under `root`; returns (model dir, parameters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from kiln.models.tokenizer import train_bpe_tokenizer

    words = [f"Step {i}: chop the onions and stir the soup for {i} minutes." for i in range(500)]
    tokenizer = train_bpe_tokenizer(words, vocab_size=4096, min_frequency=1)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
    )
    model = GPT2LMHeadModel(config)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            steps = [f"Stir the soup for {i + k} minutes." for k in range(12)]
            row = {
                "prompt": f"Recipe {i}:",
                "chosen": " " + " ".join(steps),
                "rejected": " " + " ".join(reversed(steps)),  # as many tokens, another order
                "response": " " + " ".join(steps),
            }
            f.write(json.dumps(row) + "\n")


def run(name: str, root: Path, model: Path, data: Path, steps: int, batch: int) -> float:
    """Peak RSS (MiB) of one `kiln train` process."""
    task = "instruction" if name == "sft-lora" else "preference"
    raw = {
        "name": name,
        "output_dir": str(root / name),
        "task": task,
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "val_split": 0, "cache_dir": None, "max_length": 256},
        # A DPO batch of B pairs runs 2B sequences: SFT gets 2B examples, the same tokens.
        "train": {
            "max_steps": steps,
            "batch_size": 2 * batch if task == "instruction" else batch,
            "num_threads": 2,
        },
        "log": {"every_steps": steps, "progress": "none", "plots": False},
    }
    if name.endswith("lora"):
        raw["lora"] = {"enabled": True, "r": 8}
    config = root / f"{name}.json"
    config.write_text(json.dumps(raw))
    code = (
        "import resource, sys; from kiln.cli import main; rc = main(['-q', 'train', sys.argv[1]]);"
        " print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(f"{name}: kiln train failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-dpo-memory-") as tmp:
        root = Path(tmp)
        model, params = build(root, args.width, args.layers)
        data = root / "pairs.jsonl"
        write_pairs(data, 64)
        weights_mib = params * 4 / 2**20
        print(
            f"GPT-2 {args.layers}x{args.width}: {params / 1e6:.1f}M parameters, "
            f"{weights_mib:.0f} MiB of fp32 weights; batch {args.batch_size}, {args.steps} steps"
        )
        peaks = {}
        for name in ("sft-lora", "dpo-lora", "dpo-full"):
            peaks[name] = run(name, root, model, data, args.steps, args.batch_size)
            print(f"{name:9s} peak RSS {peaks[name]:8.0f} MiB", flush=True)
        print(
            f"dpo-lora - sft-lora: {peaks['dpo-lora'] - peaks['sft-lora']:+.0f} MiB "
            f"(one weight copy would be {weights_mib:.0f})"
        )
        print(f"dpo-full - dpo-lora: {peaks['dpo-full'] - peaks['dpo-lora']:+.0f} MiB")


if __name__ == "__main__":
    main()
