"""LoRA first cut: adapters train, the base stays frozen, final/ is a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from transformers import AutoModelForCausalLM

from kiln import StopRequest, Trainer


def test_lora_trains_adapters_only_and_saves_an_adapter(tmp_path: Path, recipe_files) -> None:
    peft = pytest.importorskip("peft")

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
                trainer.control.request_stop(StopRequest("requested", "test", resumable=True))

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


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_on_finish_and_kiln_merge_match_the_adapter(tmp_path: Path, recipe_files) -> None:
    from safetensors.torch import load_file

    from kiln.cli import main
    from kiln.models.load import load_trained

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        model={"hidden_size": 128, "num_heads": 4},
        lora={
            "enabled": True,
            "r": 2,
            "dropout": 0.0,
            "modules_to_save": ["ln_f"],
            "merge_on_finish": True,
        },
        train={"max_steps": 4},
        optim={"lr": 1e-2},
    )
    trainer = Trainer(cfg)
    trainer.fit()
    final = tmp_path / "run" / "final"
    ids = torch.randint(0, 300, (2, 16))
    want = _logits(trainer.model, ids)

    # The adapter: a small fraction of the model, with the trained ln_f copy in it.
    adapter = load_file(final / "adapter_model.safetensors")
    assert any("ln_f" in name for name in adapter)
    adapter_numel = sum(t.numel() for t in adapter.values())
    total = sum(p.numel() for p in trainer.model.parameters())
    assert adapter_numel / total < 0.03
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "ln_f" in n)

    # final/merged/: transformers alone, no PEFT, same logits.
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), want, rtol=0, atol=1e-5)
    # The adapter, loaded on a base rebuilt from the config (checked by its fingerprint).
    loaded = load_trained(tmp_path / "run")
    assert loaded.kind == "adapter"
    torch.testing.assert_close(_logits(loaded.model, ids), want, rtol=0, atol=1e-6)

    out = tmp_path / "merged-cli"
    assert main(["merge", str(tmp_path / "run"), str(out)]) == 0
    again = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(again, ids), want, rtol=0, atol=1e-5)
    assert main(["merge", str(tmp_path / "run"), str(out)]) == 2  # OUT exists
    assert main(["merge", str(tmp_path / "run"), str(out), "--overwrite"]) == 0


def test_merge_refuses_a_full_model_and_a_foreign_base(
    tmp_path: Path, recipe_files, capsys
) -> None:
    import json

    from kiln.cli import main

    full = tiny_config(tmp_path / "full", *recipe_files, train={"max_steps": 3})
    Trainer(full).fit()
    assert main(["merge", str(tmp_path / "full" / "run"), str(tmp_path / "o1")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err

    cfg = tiny_config(
        tmp_path / "lora", *recipe_files, lora={"enabled": True}, train={"max_steps": 3}
    )
    Trainer(cfg).fit()
    info = tmp_path / "lora" / "run" / "final" / "kiln_base.json"
    data = json.loads(info.read_text())
    data["fingerprint"] += 1.0  # as if the adapter had been trained on another base
    info.write_text(json.dumps(data))
    assert main(["merge", str(tmp_path / "lora" / "run"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "differs from the one the adapter was trained on" in err[0]


def test_lora_on_a_model_passed_in(tmp_path: Path, recipe_files) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = tiny_config(
        tmp_path, *recipe_files, lora={"enabled": True, "r": 2}, train={"max_steps": 3}
    )
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=2))
    trainer = Trainer(cfg, model=model)
    trainer.setup()
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names
    assert all("lora_" in n for n in names)


def test_unknown_target_module_is_one_line(tmp_path: Path, recipe_files) -> None:
    from kiln.errors import KilnError

    cfg = tiny_config(
        tmp_path, *recipe_files, lora={"enabled": True, "target_modules": ["nope_proj"]}
    )
    with pytest.raises(KilnError) as err:
        Trainer(cfg).setup()
    assert str(err.value).startswith("lora.target_modules: ")
    assert "\n" not in str(err.value)


def test_missing_peft_names_the_extra(monkeypatch) -> None:
    import sys

    from kiln.models.lora import import_peft
    from kiln.registry import MissingExtra

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtra) as err:
        import_peft()
    message = str(err.value)
    assert message.startswith("lora.enabled: LoRA needs peft (")
    assert message.endswith("install it with: pip install 'kiln[lora]'")
    assert "\n" not in message


def test_qlora_errors(tmp_path: Path, recipe_files, monkeypatch) -> None:
    import sys

    from kiln.config import ConfigError
    from kiln.errors import ModelError
    from kiln.models import build_model, build_tokenizer
    from kiln.registry import MissingExtra

    with pytest.raises(ConfigError, match=r"lora\.qlora: needs lora\.enabled"):
        tiny_config(tmp_path, *recipe_files, lora={"qlora": True})
    with pytest.raises(ConfigError, match=r"lora\.qlora: quantizes a pretrained base"):
        tiny_config(tmp_path, *recipe_files, lora={"enabled": True, "qlora": True})

    # A pretrained base in a local directory.
    src = tmp_path / "base"
    scratch = tiny_config(tmp_path, *recipe_files)
    tok = build_tokenizer(scratch, ["whisk the eggs", "fold the flour"] * 20)
    build_model(scratch, tok).save_pretrained(src)
    tok.save_pretrained(src)
    model = {"arch": None, "name_or_path": str(src)}
    lora = {"enabled": True, "qlora": True}
    with pytest.raises(ConfigError, match=r"lora\.qlora: 4-bit QLoRA needs a CUDA device"):
        tiny_config(tmp_path, *recipe_files, model=model, lora=lora, train={"device": "cpu"})
    cfg = tiny_config(tmp_path, *recipe_files, model=model, lora=lora)  # device: auto
    if not torch.cuda.is_available():
        with pytest.raises(ModelError) as err:
            build_model(cfg, tok)
        assert str(err.value).startswith("lora.qlora: 4-bit QLoRA needs a CUDA GPU")
        assert "\n" not in str(err.value)
    # With a GPU but no bitsandbytes, the error names the extra to install.
    import kiln.device as precision

    monkeypatch.setattr(precision, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtra) as err:
        build_model(cfg, tok)
    assert str(err.value) == (
        "lora.qlora: 4-bit QLoRA needs bitsandbytes (import of bitsandbytes halted; None in "
        "sys.modules); install it with: pip install 'kiln[qlora]'"
    )


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tmp_path: Path, recipe_files) -> None:
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    from kiln.models import build_model, build_tokenizer

    src = tmp_path / "base"
    scratch = tiny_config(tmp_path, *recipe_files, model={"arch": "llama", "hidden_size": 64})
    tok = build_tokenizer(scratch, ["whisk the eggs", "fold the flour"] * 20)
    build_model(scratch, tok).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        model={"arch": None, "name_or_path": str(src), "gradient_checkpointing": True},
        lora={"enabled": True, "qlora": True, "r": 4, "merge_on_finish": True},
        train={"max_steps": 6, "device": "cuda", "precision": "bf16"},
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    kinds = {type(m).__name__ for m in trainer.model.modules()}
    assert "Linear4bit" in kinds
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    final = tmp_path / "run" / "final"
    base = AutoModelForCausalLM.from_pretrained(src)
    assert isinstance(peft.PeftModel.from_pretrained(base, final), peft.PeftModel)
    assert (final / "merged" / "config.json").exists()
