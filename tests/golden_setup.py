"""The golden run's data and config: fixed paths, so a committed checkpoint's config matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import make_rows, write_jsonl

# The committed checkpoint records these absolute paths in its config; data paths may not
# change on resume, so the data is written to the same place on every machine.
DATA_DIR = Path("/tmp/kiln-golden")


def write_golden_data() -> tuple[Path, Path]:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(DATA_DIR / "train.jsonl", make_rows(120, seed=1))
    val = write_jsonl(DATA_DIR / "val.jsonl", make_rows(20, seed=2))
    return train, val


def golden_raw(output_dir: Path) -> dict[str, Any]:
    return {
        "name": "golden",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {
            "arch": "gpt2",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_position_embeddings": 64,
        },
        "tokenizer": {"vocab_size": 300},
        "data": {
            "train": str(DATA_DIR / "train.jsonl"),
            "val": str(DATA_DIR / "val.jsonl"),
            "max_length": 32,
            "cache_dir": str(output_dir.parent / "cache"),
        },
        "optim": {"lr": 3e-3, "warmup_steps": 3, "scheduler": "cosine"},
        "train": {"max_steps": 30, "batch_size": 4, "grad_accum_steps": 2, "grad_clip": 1.0},
        "eval": {"every_steps": 10},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "log": {"every_steps": 5, "progress": "none", "plots": False},
    }


def golden_config(output_dir: Path) -> Any:
    from kiln.config import load_config

    return load_config(data=golden_raw(output_dir))
