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


def test_lora_resume_is_exact_and_checkpoints_only_adapters(tmp_path: Path, recipe_files) -> None:
    from safetensors.torch import load_file

    from kiln import Callback

    class Pause(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.state.step == 3:
                trainer.request_stop("test", resumable=True)

    def cfg(name: str):
        return tiny_config(
            tmp_path / name,
            *recipe_files,
            lora={"enabled": True, "r": 4, "dropout": 0.1},
            train={"max_steps": 6},
        )

    ref = Trainer(cfg("ref"))
    ref_result = ref.fit()
    Trainer(cfg("cut"), callbacks=[Pause()]).fit()
    ckpt = tmp_path / "cut" / "run" / "checkpoints" / "step-3" / "model.safetensors"
    assert all("lora_" in name for name in load_file(ckpt))
    resumed = Trainer(cfg("cut"), resume=True)
    result = resumed.fit()
    assert result.loss_history == ref_result.loss_history
    ref_state = ref.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
