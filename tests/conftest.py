"""Shared fixtures: tiny recipe-like data and configs, built in-process, offline."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from kiln.config import RunConfig, load_config

_DISHES = ["Rice", "Soup", "Stew", "Salad", "Curry", "Pasta", "Omelette", "Tacos"]
_MAINS = ["Lemon", "Garlic", "Tomato", "Chickpea", "Mushroom", "Ginger", "Basil", "Spinach"]
_VERBS = ["Chop", "Stir", "Simmer", "Bake", "Whisk", "Season", "Serve", "Rinse"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Small recipe rows with the bundled dataset's fields."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        title = f"{rng.choice(_MAINS)} {rng.choice(_DISHES)} {i}"
        ingredients = [f"{rng.randint(1, 4)} cups {rng.choice(_MAINS).lower()}" for _ in range(3)]
        steps = [f"{rng.choice(_VERBS)} the {rng.choice(_MAINS).lower()}." for _ in range(3)]
        text = (
            f"Title: {title}\n\nIngredients:\n"
            + "\n".join(f"- {x}" for x in ingredients)
            + "\n\nSteps:\n"
            + "\n".join(f"{j + 1}. {s}" for j, s in enumerate(steps))
        )
        rows.append(
            {
                "title": title,
                "ingredients": ingredients,
                "steps": steps,
                "text": text,
                "quality_score": round(rng.random(), 3),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def recipe_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(20, seed=2))
    return train, val


def tiny_config(
    tmp_path: Path, train_file: Path, val_file: Path | None, /, **sections: Any
) -> RunConfig:
    """A 2-layer GPT-2 config over the given files, writing into tmp_path/run."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {
            "arch": "gpt2",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_position_embeddings": 64,
        },
        "tokenizer": {"vocab_size": 300},
        "data": {"train": str(train_file), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 20, "batch_size": 4},
        "log": {"every_steps": 5, "progress": "none"},
    }
    if val_file is not None:
        raw["data"]["val"] = str(val_file)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(data=raw)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def bpe_tokenizer(corpus: list[str], vocab_size: int = 320) -> Any:
    """A tiny byte-level BPE trained in-process with the `tokenizers` library alone (no kiln)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
