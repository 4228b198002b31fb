"""Training killed for real, in a subprocess: SIGTERM pauses cleanly, SIGKILL loses nothing."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_rows, start_train, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _config(tmp: Path, data: Path, name: str) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp / name),
        "seed": 3,
        "model": {
            "arch": "gpt2",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "max_position_embeddings": 64,
            "dropout": 0.1,
        },
        "tokenizer": {"vocab_size": 300},
        "data": {"train": str(data), "val_split": 0.1, "max_length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": 60, "batch_size": 8, "grad_accum_steps": 2},
        "eval": {"every_steps": 20, "max_batches": 2},
        "checkpoint": {"every_steps": 1, "keep_last": 2, "resume": "auto"},
        "log": {"every_steps": 5, "progress": "none"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("kill")
    data = write_jsonl(tmp / "train.jsonl", make_rows(400, seed=5))
    proc = start_train(_config(tmp, data, "ref"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return tmp, data


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "final" / "model.safetensors"),
        load_file(b / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _train_losses(run: Path) -> list[tuple[int, float]]:
    import json

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any((run / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_checkpoints_and_resumes_exactly(reference: tuple[Path, Path]) -> None:
    tmp, data = reference
    config = _config(tmp, data, "term")
    run = tmp / "term"
    proc = start_train(config)
    _wait_for_checkpoint(run, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert "continue with: kiln train" in out
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert 0 < steps[-1] < 60
    assert not (run / "final").exists()

    proc = start_train(config, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _same_weights(run, tmp / "ref")
    assert _train_losses(run) == _train_losses(tmp / "ref")


def test_sigkill_at_random_moments_then_resume_is_exact(reference: tuple[Path, Path]) -> None:
    tmp, data = reference
    config = _config(tmp, data, "kill")
    run = tmp / "kill"
    rng = random.Random(1234)
    kills = 0
    for _ in range(6):
        proc = start_train(config)
        if kills == 0:
            _wait_for_checkpoint(run, proc)
        # Checkpoints are written every step, so many kills land inside a checkpoint write.
        time.sleep(rng.uniform(0.2, 2.5))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 3
    proc = start_train(config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _same_weights(run, tmp / "ref")
    assert _train_losses(run) == _train_losses(tmp / "ref")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == []
