"""The golden run's data and config: fixed paths, so a committed checkpoint's config matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import make_rows, tiny_raw, write_jsonl

# The committed checkpoint records these absolute paths in its config; data paths may not
# change on resume, so the data is written to the same place on every machine.
DATA_DIR = Path("/tmp/kiln-golden")


def write_golden_data() -> tuple[Path, Path]:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(DATA_DIR / "train.jsonl", make_rows(120, seed=1))
    val = write_jsonl(DATA_DIR / "val.jsonl", make_rows(20, seed=2))
    return train, val


def golden_raw(output_dir: Path) -> dict[str, Any]:
    raw = tiny_raw(
        output_dir.parent,
        DATA_DIR / "train.jsonl",
        DATA_DIR / "val.jsonl",
        name="golden",
        optim={"warmup_steps": 3, "scheduler": "cosine"},
        train={"max_steps": 30, "grad_accum_steps": 2, "grad_clip": 1.0},
        eval={"every_steps": 10},
        checkpoint={"every_steps": 10, "keep_last": 2},
    )
    raw["output_dir"] = str(output_dir)
    return raw


def golden_config(output_dir: Path) -> Any:
    from kiln.config import load_config

    return load_config(data=golden_raw(output_dir))
