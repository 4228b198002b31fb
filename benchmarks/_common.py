"""Pieces the benchmarks share: the GPT-2 they measure and the kiln config that trains it.

Imported by the scripts next to it (`python benchmarks/<name>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kiln import RunConfig, load_config

__all__ = ["gpt2", "kiln_config"]


def gpt2(args: argparse.Namespace) -> GPT2LMHeadModel:
    """A seeded GPT-2 sized by the flags (vocab, seq_len, width, layers, heads): no dropout,
    no KV cache (training never uses it), sdpa attention."""
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="sdpa",
        bos_token_id=args.vocab - 1,  # GPT-2's 50256 lies outside the small vocabulary
        eos_token_id=args.vocab - 1,
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def kiln_config(
    name: str,
    args: argparse.Namespace,
    out: Path,
    *,
    optim: dict[str, Any],
    train: dict[str, Any],
    log: dict[str, Any],
) -> RunConfig:
    """A CPU kiln config for a model and data passed in as objects (the model fields only
    document the shape: nothing is built from them)."""
    return load_config(
        data={
            "name": name,
            "output_dir": str(out),
            "seed": args.seed,
            "model": {
                "arch": "gpt2",
                "hidden_size": args.width,
                "num_layers": args.layers,
                "num_heads": args.heads,
                "max_position_embeddings": args.seq_len,
            },
            # Every block trains (the contenders draw the same batches): no validation split.
            "data": {"train": "(passed in memory)", "max_length": args.seq_len, "val_split": 0.0},
            "optim": optim,
            "train": {"device": "cpu", "num_threads": args.threads, **train},
            "log": {"progress": "none", **log},
        }
    )
