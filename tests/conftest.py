"""Fixtures and collection hooks; shared helpers live in `helpers.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_rows, write_jsonl


@pytest.fixture
def recipe_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(20, seed=2))
    return train, val


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
