"""The golden run's data and config: fixed paths, so a committed checkpoint's config matches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from helpers import make_rows, tiny_raw

# The committed checkpoint records these absolute paths in its config; data paths may not
# change on resume, so the data is written to the same place on every machine.
DATA_DIR = Path("/tmp/kiln-golden")


def write_golden_data() -> tuple[Path, Path]:
    """The golden data files, written only when missing or different, and then atomically: a
    reader (another test, another checkout's run on this machine) never sees one truncated."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": make_rows(120, seed=1), "val.jsonl": make_rows(20, seed=2)}
    for name, rows in files.items():
        path = DATA_DIR / name
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.is_file() or path.read_text() != text:
            staged = DATA_DIR / f".{name}.{os.getpid()}.tmp"
            staged.write_text(text)
            os.replace(staged, path)
    return DATA_DIR / "train.jsonl", DATA_DIR / "val.jsonl"


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
