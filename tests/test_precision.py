"""Mixed precision and device selection: bf16 autocast on CPU, fp16 + grad scaler on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from kiln import Trainer
from kiln.engine.precision import Precision, resolve_device
from kiln.errors import KilnError


def test_cpu_bf16_trains(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, train={"precision": "bf16", "max_steps": 20})
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert sum(result.loss_history[-5:]) < sum(result.loss_history[:5])
    # autocast computes in bf16 but leaves the weights (and optimizer state) in fp32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_device_errors_are_clear() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(KilnError, match=r"train\.device: cuda requested but CUDA is not"):
            resolve_device("cuda")
    with pytest.raises(KilnError, match=r"train\.precision: fp16 needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))
    assert Precision("fp32", torch.device("cpu")).scaler is None


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_precisions_train(tmp_path: Path, recipe_files, precision: str) -> None:
    cfg = tiny_config(
        tmp_path, *recipe_files, train={"precision": precision, "device": "cuda", "max_steps": 20}
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert (trainer.precision.scaler is not None) == (precision == "fp16")
    assert sum(result.loss_history[-5:]) < sum(result.loss_history[:5])
