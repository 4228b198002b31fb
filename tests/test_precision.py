"""Mixed precision and device selection: bf16 autocast on CPU, fp16 + grad scaler on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from kiln import Trainer
from kiln.device import Precision, resolve_device
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


def test_tf32_switch_sets_the_cuda_backends_and_ignores_cpu() -> None:
    from kiln.device import set_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        set_tf32(True, torch.device("cpu"))
        assert (matmul.fp32_precision, conv.fp32_precision) == before
        set_tf32(True, torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False, torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_fused_adamw_is_used(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 3})
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.optimizer.defaults["fused"] is True  # CPU and CUDA both have the kernel


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, recipe_files) -> None:
    # Unpacked, variable-length documents: compile sees bucketed lengths, not one per batch.
    import torch._dynamo

    def run(name: str, compile: bool) -> list[float]:
        cfg = tiny_config(
            tmp_path / name,
            *recipe_files,
            data={"packing": False},
            train={"max_steps": 6, "compile": compile, "compile_pad_multiple": 32},
            eval={"every_steps": None},
        )
        return Trainer(cfg).fit().loss_history

    eager = run("eager", False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run("compiled", True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= 4  # train + eval forward, not one graph per batch
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_compile_bf16_trains(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"precision": "bf16", "device": "cuda", "max_steps": 20, "compile": True},
    )
    result = Trainer(cfg).fit()
    assert sum(result.loss_history[-5:]) < sum(result.loss_history[:5])
