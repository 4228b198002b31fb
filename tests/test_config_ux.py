"""What a new user meets first in configs (issue 26): exclusive keys across layers (item 26),
`cfg.validate()` and the hints for other trainers' flat keys (item 29)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.cli import main
from kiln.config import ConfigError, RunConfig, load_config
from kiln.config.suggest import ALIASES, all_keys

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- item 26: a later layer that sets one of two exclusive keys drops the other ----------


def test_item26_override_name_or_path_over_a_config_with_arch(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["model.name_or_path=my/base-model"])
    assert (cfg.model.name_or_path, cfg.model.arch) == ("my/base-model", None)
    assert cfg.model.hidden_size == 128  # the rest of the section stays


def test_item26_override_arch_over_a_config_with_name_or_path(tmp_path: Path) -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["model"] = {"name_or_path": "my/base-model"}
    cfg = load_config(_write(tmp_path / "c.yaml", raw), ["model.arch=gpt2"])
    assert (cfg.model.name_or_path, cfg.model.arch) == (None, "gpt2")


def test_item26_python_edits_drop_the_other_key_too() -> None:
    cfg = load_config(QUICKSTART)
    pretrained = cfg.replace(**{"model.name_or_path": "my/base-model"})
    assert (pretrained.model.name_or_path, pretrained.model.arch) == ("my/base-model", None)
    back = pretrained.replace("model.arch=gpt2")
    assert (back.model.name_or_path, back.model.arch) == (None, "gpt2")
    section = cfg.model.replace(name_or_path="x")  # the section alone knows its path
    assert (section.name_or_path, section.arch) == ("x", None)


def test_item26_both_in_one_layer_are_still_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["model"]["name_or_path"] = "my/base-model"
    with pytest.raises(ConfigError, match=r"set exactly one of model\.name_or_path or model\.arch"):
        load_config(_write(tmp_path / "c.yaml", raw))


def test_item26_an_override_to_null_keeps_the_other(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["model.name_or_path=null"])
    assert (cfg.model.name_or_path, cfg.model.arch) == (None, "gpt2")


def test_item26_the_cli_accepts_the_override(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["config", "validate", str(QUICKSTART), "model.name_or_path=my/base-model"])
    assert code == 0, capsys.readouterr().err
    assert "exactly one" not in capsys.readouterr().err


# ---- item 29: cfg.validate() ---------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_item29_validate_returns_the_config(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.validate() is cfg


def test_item29_validate_checks_the_shipped_configs_count() -> None:
    assert len(CONFIGS) >= 3  # quickstart, recipe_t5, and the examples


def test_item29_validate_names_a_value_changed_in_place() -> None:
    cfg = RunConfig(lora={"enabled": True, "target_modules": ["c_attn"]})
    cfg.lora.target_modules.clear()  # a list inside a frozen config is still a list
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.problems == ["lora.target_modules: name at least one module, or all-linear"]


def test_item29_validate_names_a_value_set_around_the_freeze() -> None:
    # Both sections given, so they are this config's own (an untouched section may be the
    # shared default instance, and writing around the freeze would change every config's).
    cfg = RunConfig(train={"max_steps": 10}, optim={"lr": 1e-3})
    object.__setattr__(cfg.train, "batch_size", 0)  # a field left at its default before
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("train.batch_size: ")
    object.__setattr__(cfg.optim, "warmup_steps", 10)  # a cross-section check
    object.__setattr__(cfg.train, "batch_size", 8)
    with pytest.raises(ConfigError, match=r"optim.warmup_steps: must be < train.max_steps \(10\)"):
        cfg.validate()


def test_item29_validate_keeps_a_preset_config_as_it_is() -> None:
    cfg = RunConfig(preset="baseline", optim={"lr": 1e-3})
    assert cfg.validate() is cfg
    assert (cfg.optim.lr, cfg.train.max_steps) == (1e-3, 1000)


# ---- item 29: hints for the flat keys seed users write --------------------------------------

FLAT_HINTS = {
    "learning_rate": "optim.lr",
    "batch_size": "train.batch_size",
    "num_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "checkpoint_dir": "output_dir",
    "experiment_name": "name",
    "run_name": "name",
    "save_steps": "checkpoint.every_steps",
    "eval_steps": "eval.every_steps",
    "logging_steps": "log.every_steps",
    "warmup_steps": "optim.warmup_steps",
    "model_name": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "max_grad_norm": "train.grad_clip",
    "scheduler_type": "optim.scheduler",
    "mixed_precision": "train.precision",
    "use_lora": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "early_stopping_patience": "eval.early_stopping.patience",
    "train_data": "data.train",
    "val_dataset": "data.val",
    "train_split": "data.val_split",
    "max_checkpoints": "checkpoint.keep_last",
    "wandb_project": "log.wandb.project",
    "weight_decay": "optim.weight_decay",
    "total_steps": "train.max_steps",
    "vocab_size": "tokenizer.vocab_size",
}


@pytest.mark.parametrize(("key", "meant"), FLAT_HINTS.items())
def test_item29_flat_key_hint_in_a_file(tmp_path: Path, key: str, meant: str) -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw[key] = 1
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path / "c.yaml", raw))
    assert err.value.problems == [f"{key}: unknown key; did you mean {meant}?"]


@pytest.mark.parametrize(
    ("path", "meant"),
    [
        ("log.mlflow.experiment_name", "log.mlflow.experiment"),  # a close sibling wins
        ("train.save_steps", "checkpoint.every_steps"),  # not train.max_steps
        ("train.warmup_steps", "optim.warmup_steps"),  # the same name elsewhere, not max_steps
        ("train.use_lora", "lora.enabled"),
        ("train.learning_rate", "optim.lr"),
        ("data.max_input_length", "data.max_length"),  # not max_target_length
        ("train.batchsize", "train.batch_size"),
    ],
)
def test_item29_nested_key_hint(path: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [f"{path}=1"])
    assert err.value.problems == [f"{path}: unknown key; did you mean {meant}?"]


def test_item29_every_alias_names_an_existing_value_key() -> None:
    keys = set(all_keys())
    sections = {k.rpartition(".")[0] for k in keys}
    wrong = {name: key for name, key in ALIASES.items() if key not in keys or key in sections}
    assert not wrong
    assert not [name for name in ALIASES if name in keys]  # an alias never hides a real key


def test_item29_dashed_flag_hint_uses_the_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", str(QUICKSTART), "--checkpoint_dir", "out"])
    assert done.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "unknown option --checkpoint_dir; config values are dotted overrides: output_dir=out"
        )
    )
