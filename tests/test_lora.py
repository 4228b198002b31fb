"""LoRA first cut: adapters train, the base stays frozen, final/ is a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from kiln import Trainer


def test_lora_trains_adapters_only_and_saves_an_adapter(tmp_path: Path, recipe_files) -> None:
    import peft

    cfg = tiny_config(
        tmp_path, *recipe_files, lora={"enabled": True, "r": 4}, train={"max_steps": 5}
    )
    trainer = Trainer(cfg)
    trainer.setup()
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists()
    assert (final / "adapter_model.safetensors").stat().st_size < 200_000

    base_model = AutoModelForCausalLM.from_config(trainer.model.get_base_model().config)
    missing, unexpected = base_model.load_state_dict(
        {
            n.removeprefix("base_model.model.").replace(".base_layer", ""): t
            for n, t in base.items()
        },
        strict=False,
    )
    assert unexpected == []
    assert set(missing) <= {"lm_head.weight"}  # tied to the input embedding
    loaded = peft.PeftModel.from_pretrained(base_model, final).eval()
    ids = torch.randint(0, 200, (1, 12))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits)
