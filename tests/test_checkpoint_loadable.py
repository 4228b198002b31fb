"""Issue 26 item 31: `checkpoints/step-N/` opens with transformers (`AutoModelForCausalLM.
from_pretrained`, and `PeftModel.from_pretrained` for LoRA) and `AutoTokenizer`, with the same
logits as the trainer's model at that step; the manifest covers every file and resume is
unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config

from kiln import Callback, Trainer
from kiln.checkpoint import CheckpointManager

PROMPT = "Title: Lemon Rice\n\nIngredients:\n- 2 cups rice"


class Logits(Callback):
    """At each periodic checkpoint: the trainer's model's logits on PROMPT, by path."""

    def __init__(self) -> None:
        self.at: dict[Path, torch.Tensor] = {}

    def on_checkpoint(self, run: Any, path: Path, kind: str) -> None:
        if kind == "final":
            return
        ids = run.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        was = run.model.training
        run.model.eval()
        with torch.no_grad():
            self.at[path] = run.model(input_ids=ids).logits.clone()
        run.model.train(was)


def _train(cfg: Any) -> tuple[Trainer, Logits]:
    logits = Logits()
    trainer = Trainer(cfg, callbacks=[logits])
    trainer.fit()
    return trainer, logits


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_item31_step_checkpoint_loads_with_from_pretrained(tmp_path: Path, recipe_files) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(
        tmp_path, *recipe_files, train={"max_steps": 8}, checkpoint={"every_steps": 4}
    )
    trainer, seen = _train(cfg)
    step4 = cfg.run_dir / "checkpoints" / "step-4"
    assert step4 in seen.at
    attn = trainer.model.config._attn_implementation  # the same kernels: exact logits
    model = AutoModelForCausalLM.from_pretrained(step4, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(step4)
    assert tokenizer(PROMPT)["input_ids"] == trainer.tokenizer(PROMPT)["input_ids"]
    assert torch.equal(_logits(model, tokenizer), seen.at[step4])
    # Every file of the checkpoint is in its manifest, and the checkpoint verifies.
    manifest = json.loads((step4 / "manifest.json").read_text())
    on_disk = {p.relative_to(step4).as_posix() for p in step4.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= on_disk
    CheckpointManager(step4.parent).verify(step4)


def test_item31_lora_step_checkpoint_loads_with_peft(tmp_path: Path, recipe_files) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        lora={"enabled": True, "r": 4, "alpha": 8},
        train={"max_steps": 6},
        optim={"lr": 1e-2},
        checkpoint={"every_steps": 3},
    )
    trainer, seen = _train(cfg)
    step3 = cfg.run_dir / "checkpoints" / "step-3"
    on_disk = {p.name for p in step3.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= on_disk
    assert "config.json" not in on_disk  # AutoModel would load a random base, not the adapter
    final = _logits(trainer.model, trainer.tokenizer)
    base = trainer.model.unload()  # the frozen base, the adapters taken out (not merged)
    model = PeftModel.from_pretrained(base, step3)
    logits = _logits(model, trainer.tokenizer)
    assert torch.equal(logits, seen.at[step3])
    assert not torch.equal(logits, final)  # step 3's adapter, not the last one
