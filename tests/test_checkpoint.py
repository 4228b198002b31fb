"""Checkpoints: atomic writes, rotation, keep-best, and a resume that is bit-exact."""

from __future__ import annotations

import errno
import json
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import StopAt, logged_metrics, tiny_config
from safetensors.torch import load_file

import kiln.checkpoint
from kiln import Callback, StopRequest, Trainer
from kiln.checkpoint import CheckpointManager
from kiln.errors import KilnError
from kiln.files import StorageFull
from kiln.models import train_bpe_tokenizer

GOLDEN_CKPT = Path(__file__).parent / "golden" / "ckpt_v1" / "checkpoints" / "step-10"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_bpe_tokenizer(["Title: Rice\nSteps:\n1. Rinse the rice."] * 10, vocab_size=300)


def _data(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 250, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _cfg(tmp_path: Path, recipe_files, **sections: Any):
    base = {
        "model": {"dropout": 0.1},  # dropout makes the RNG state matter
        "train": {"max_steps": 8, "batch_size": 3, "grad_accum_steps": 2},
        "eval": {"every_steps": 2},
        "log": {"every_steps": 3},
        "optim": {"scheduler": "cosine", "warmup_steps": 2},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(tmp_path, *recipe_files, **base)


def _run(cfg, tokenizer, **kwargs: Any):
    trainer = Trainer(
        cfg,
        tokenizer=tokenizer,
        train_data=_data(10, 0),  # 3 batches of 3 per epoch: epochs end mid-window
        val_data=_data(4, 1),
        **kwargs,
    )
    return trainer, trainer.fit()


@pytest.mark.parametrize("stop_at", [1, 2, 3, 5, 7])
def test_resume_is_bit_exact(tmp_path: Path, recipe_files, tokenizer, stop_at: int) -> None:
    ref_trainer, ref = _run(_cfg(tmp_path / "ref", recipe_files), tokenizer)

    cfg = _cfg(tmp_path / "cut", recipe_files)
    first, _ = _run(cfg, tokenizer, callbacks=[StopAt(stop_at)])
    assert first.state.step == stop_at
    assert [p.name for p in first.checkpoint_paths] == [f"step-{stop_at}"]
    resumed_trainer, resumed = _run(cfg, tokenizer, resume=True)

    assert (
        resumed_trainer.resumed_from == tmp_path / "cut" / "run" / "checkpoints" / f"step-{stop_at}"
    )
    assert resumed.loss_history == ref.loss_history
    assert resumed.metrics == ref.metrics
    for name, tensor in ref_trainer.model.state_dict().items():
        assert torch.equal(tensor, resumed_trainer.model.state_dict()[name]), name
    assert logged_metrics(tmp_path / "cut" / "run") == logged_metrics(tmp_path / "ref" / "run")


def test_checkpoint_files_and_manifest(tmp_path: Path, recipe_files, tokenizer) -> None:
    trainer, _ = _run(_cfg(tmp_path, recipe_files, checkpoint={"every_steps": 4}), tokenizer)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-8"]
    ckpt = root / "step-8"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 8
    kiln_files = {
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "trainer_state.json",
        "config.yaml",
    }
    # ... and what transformers loads it with (config.json, the tokenizer): every file listed.
    on_disk = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert kiln_files | {"config.json", "tokenizer_config.json"} <= on_disk
    assert set(manifest["files"]) == on_disk
    assert manifest["metrics"]["val_loss"] == trainer.history[-1]["val_loss"]
    weights = load_file(ckpt / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, trainer.model.state_dict()[name])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # A named map of stateful components (format 2).
    assert state["format"] == 2
    assert set(state) >= {"loop", "scaler", "callbacks", "components", "data", "tokenizer"}
    assert state["loop"]["state"]["step"] == 8
    assert CheckpointManager(root).verify(ckpt).step == 8


def _writers(payload: bytes) -> dict[str, Any]:
    return {"a.bin": lambda p: p.write_bytes(payload), "b.json": lambda p: p.write_text("{}")}


def test_rotation_keeps_last_and_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=1, metric="val_loss", mode="min")
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 4.0, 6: 3.5}
    for step, loss in losses.items():
        manager.save(step, _writers(b"x" * step), metrics={"val_loss": loss})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-5", "step-6"]
    assert manager.best().step == 2
    assert manager.latest().step == 6

    maxed = CheckpointManager(tmp_path / "max", keep_last=1, keep_best=2, mode="max")
    for step, loss in losses.items():
        maxed.save(step, _writers(b"y"), metrics={"val_loss": loss})
    assert sorted(p.name for p in (tmp_path / "max").iterdir()) == ["step-5", "step-6"]


def test_newest_checkpoint_survives_rotation(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="val_loss")
    manager.save(1, _writers(b"a"), metrics={"val_loss": 1.0})
    manager.save(2, _writers(b"b"), metrics={"val_loss": 9.0})  # worse, but newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2"]


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(1, _writers(b"ok"))
    (tmp_path / "step-7").mkdir()  # renamed but manifest-less: impossible by construction,
    (tmp_path / "step-7" / "a.bin").write_bytes(b"torn")  # yet must never be loaded
    (tmp_path / ".staging-step-9-123").mkdir()
    truncated = manager.save(3, _writers(b"12345"))
    (truncated / "a.bin").write_bytes(b"12")  # torn file: size differs from the manifest
    assert [c.step for c in manager.list()] == [1]
    assert manager.latest().step == 1
    with pytest.raises(ValueError, match="not a complete kiln checkpoint"):
        manager.verify(tmp_path / "step-7")
    removed = manager.clean_incomplete()
    assert {p.name for p in removed} == {"step-7", ".staging-step-9-123", "step-3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, _writers(b"abcd"))
    (path / "a.bin").write_bytes(b"abcX")  # same size, different bytes
    with pytest.raises(ValueError, match="corrupt"):
        manager.verify(path)


def test_failed_write_leaves_previous_checkpoint_intact(
    tmp_path: Path, recipe_files, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, recipe_files, checkpoint={"every_steps": 2})
    trainer = Trainer(cfg, tokenizer=tokenizer, train_data=_data(10, 0), val_data=_data(4, 1))

    class FullDisk(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.state.step == 4:

                def no_space(*args: Any, **kwargs: Any) -> None:
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr("kiln.engine.resume.torch.save", no_space)

    trainer.callbacks.append(FullDisk())
    with pytest.raises(StorageFull, match="no space left on device while writing checkpoint"):
        trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no staging left behind
    info = CheckpointManager(root).verify(root / "step-2")
    assert info.step == 2
    monkeypatch.undo()
    resumed, result = _run(cfg, tokenizer, resume=True)
    assert resumed.resumed_from == root / "step-2"
    assert result.summary["steps"] == 8


def test_unsafe_config_change_is_refused_safe_one_reported(
    tmp_path: Path, recipe_files, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, recipe_files)
    _run(cfg, tokenizer, callbacks=[StopAt(3)])
    wider = _cfg(tmp_path, recipe_files, model={"hidden_size": 64})
    with pytest.raises(KilnError, match=r"model\.hidden_size: 32 -> 64"):
        _run(wider, tokenizer, resume=True)
    longer = _cfg(tmp_path, recipe_files, train={"max_steps": 10})
    with caplog.at_level("INFO", logger="kiln"):
        _, result = _run(longer, tokenizer, resume=True)
    assert "train.max_steps: 8 -> 10" in caplog.text
    assert result.summary["steps"] == 10


def test_resume_auto_and_missing_checkpoint(tmp_path: Path, recipe_files, tokenizer) -> None:
    cfg = _cfg(tmp_path, recipe_files, checkpoint={"resume": "auto"})
    trainer, _ = _run(cfg, tokenizer, callbacks=[StopAt(2)])
    assert trainer.resumed_from is None  # nothing to resume yet: a fresh start
    trainer, result = _run(cfg, tokenizer)
    assert trainer.resumed_from is not None
    assert result.summary["steps"] == 8
    with pytest.raises(KilnError, match="no complete checkpoint"):
        _run(_cfg(tmp_path / "other", recipe_files), tokenizer, resume=True)


def test_stop_inside_validation_checkpoints_and_redoes_it(
    tmp_path: Path, recipe_files, tokenizer
) -> None:
    class StopInValidation(Callback):
        def on_validation_begin(self, trainer: Trainer) -> None:
            if trainer.state.step == 4:
                trainer.control.request_stop(
                    StopRequest("signal", "signal SIGTERM", resumable=True)
                )

    _, ref = _run(_cfg(tmp_path / "ref", recipe_files), tokenizer)
    cfg = _cfg(tmp_path / "cut", recipe_files)
    first, paused = _run(cfg, tokenizer, callbacks=[StopInValidation()])
    assert first.state.step == 4
    assert [m["step"] for m in paused.metrics] == [2]  # step 4's validation was cut short
    assert paused.final_dir is None
    state = json.loads((first.checkpoint_paths[-1] / "trainer_state.json").read_text())
    assert state["loop"]["validation_pending"] is True
    _, resumed = _run(cfg, tokenizer, resume=True)
    assert resumed.metrics == ref.metrics
    assert logged_metrics(tmp_path / "cut" / "run") == logged_metrics(tmp_path / "ref" / "run")


def _bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _flip(file: Path, at: int) -> None:
    """Bit rot: one byte changed, the size kept."""
    raw = bytearray(file.read_bytes())
    raw[at] ^= 0xFF
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2503])
def test_manifest_records_each_piece_crc32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(kiln.checkpoint, "_PIECE", 1000)
    monkeypatch.setattr(kiln.checkpoint, "_BUFFER", 300)  # several reads chained per piece
    data = _bytes(size)
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, _writers(data))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 2
    crcs = [f"{zlib.crc32(data[i : i + 1000]):08x}" for i in range(0, size, 1000)]
    assert manifest["files"]["a.bin"] == {"size": size, "piece": 1000, "crc32": crcs}
    assert manager.verify(path).step == 1


def test_corrupt_piece_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kiln.checkpoint, "_PIECE", 1000)
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, _writers(_bytes(2503)))
    monkeypatch.setattr(kiln.checkpoint, "_PIECE", 7)  # verify reads the manifest's piece size
    _flip(path / "a.bin", 1500)
    with pytest.raises(ValueError, match="piece 2 of 3") as err:
        manager.verify(path)
    assert str(err.value) == (
        f"{path / 'a.bin'}: corrupt (crc32 of piece 2 of 3, bytes 1000-1999, differs from the "
        "manifest)"
    )
    _flip(path / "a.bin", 2502)
    with pytest.raises(ValueError, match=r"piece 2 of 3, bytes 1000-1999, .*; 1 more piece"):
        manager.verify(path)


def test_malformed_manifest_entry_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, _writers(b"abcd"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["a.bin"]["crc32"] = []  # 4 bytes need one piece
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: malformed entry for a\.bin"):
        manager.verify(path)


def test_format_1_checkpoint_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint of the first manifest format (one whole-file crc32 per file)."""
    monkeypatch.setattr(kiln.checkpoint, "_BUFFER", 4096)  # the crc32 chained over many reads
    root = tmp_path / "checkpoints"
    shutil.copytree(GOLDEN_CKPT, root / "step-10")
    manager = CheckpointManager(root)
    assert json.loads((root / "step-10" / "manifest.json").read_text())["format"] == 1
    assert [c.step for c in manager.list()] == [10]
    assert manager.verify(root / "step-10").step == 10
    _flip(root / "step-10" / "model.safetensors", 100_000)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt \(crc32 of the whole file"):
        manager.verify(root / "step-10")


def test_resume_skips_a_corrupt_latest_checkpoint(
    tmp_path: Path, recipe_files, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, recipe_files, checkpoint={"every_steps": 2})
    _run(cfg, tokenizer, callbacks=[StopAt(5)])  # checkpoints at 2, 4 and 5
    newest = tmp_path / "run" / "checkpoints" / "step-5" / "model.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF  # bit rot: same size, different bytes
    newest.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="kiln"):
        trainer, result = _run(cfg, tokenizer, resume=True)
    assert trainer.resumed_from == tmp_path / "run" / "checkpoints" / "step-4"
    assert "corrupt" in caplog.text
    assert result.summary["steps"] == 8
