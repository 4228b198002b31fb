"""Config: validation, overrides, presets, YAML round trip, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from kiln.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_hash,
    dump_yaml,
    load_config,
    parse_override_value,
)

BASE = {
    "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "data": {"train": "train.jsonl"},
    "train": {"max_steps": 10},
}


def problems(overrides: list[str], data: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data=data or BASE, overrides=overrides)
    return info.value.problems


def test_defaults_and_frozen() -> None:
    cfg = load_config(data=BASE)
    assert cfg.optim.lr == 3e-4
    assert cfg.run_dir == Path("runs/run")
    with pytest.raises(Exception, match="frozen"):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("3", 3),
        ("0.5", 0.5),
        ("true", True),
        ("False", False),
        ("null", None),
        ("[q, v]", ["q", "v"]),
        ("[0.9, 0.95]", [0.9, 0.95]),
        ("hello", "hello"),
        ("a: b: c", "a: b: c"),
    ],
)
def test_override_value_coercion(text: str, value: object) -> None:
    assert parse_override_value(text) == value


def test_overrides_apply_typed_values() -> None:
    cfg = load_config(
        data=BASE,
        overrides=[
            "optim.lr=1e-3",
            "train.batch_size=4",
            "optim.betas=[0.9,0.95]",
            "train.grad_clip=null",
            "lora.target_modules=[q,v]",
            "name=exp1",
        ],
    )
    assert cfg.optim.lr == 1e-3
    assert cfg.train.batch_size == 4
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.grad_clip is None
    assert cfg.lora.target_modules == ["q", "v"]
    assert cfg.run_dir == Path("runs/exp1")


def test_yaml_file_reads_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "optim:\n  lr: 3e-4\n")
    cfg = load_config(path)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == 3e-4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=-1"], "optim.lr: input should be greater than 0 (got -1)"),
        (["train.max_stepz=3"], "train.max_stepz: unknown key"),
        (["bogus=1"], "bogus: unknown key"),
        (["train.batch_size=abc"], "train.batch_size: input should be a valid integer"),
        (["train.precision=fp8"], "train.precision: input should be 'fp32', 'bf16' or 'fp16'"),
        (["model.arch=t5"], "model.arch: t5 is a seq2seq model, but task is causal_lm"),
        (["optim.warmup_steps=10"], "optim.warmup_steps: must be < train.max_steps (10), got 10"),
        (["train.max_steps=null"], "set train.max_steps or train.num_epochs"),
        (["preset=turbo"], "preset: unknown preset 'turbo'"),
        # (one override over the file's model.arch drops it: tests/test_config_ux.py)
        (["model={name_or_path: gpt2, arch: gpt2}"], "set exactly one of model.name_or_path or"),
        (["train.precision=fp16", "train.device=cpu"], "train.precision: fp16 needs a CUDA"),
        (["model.num_heads=3"], "model.num_heads: must divide model.hidden_size (32), got 3"),
        (["data.max_length=4096"], "data.max_length: 4096 exceeds model.max_position_embeddings"),
        (["train.device=tpu"], "train.device: expected auto, cpu, mps, cuda or cuda:N"),
        (["optim.lr"], "optim.lr: an override must look like section.key=value"),
        (["data.min_chars=10", "data.max_chars=5"], "data.min_chars: must be <= data.max_chars"),
        (["optim.lr=1", "optim.lr.x=1"], "optim.lr: is a value, not a section"),
    ],
)
def test_errors_name_the_key_path(overrides: list[str], expected: str) -> None:
    lines = problems(overrides)
    assert any(expected in line for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_missing_required_section() -> None:
    data = {k: v for k, v in BASE.items() if k != "data"}
    assert problems([], data) == ["data: required key is missing"]


def test_several_problems_reported_together() -> None:
    lines = problems(["optim.lr=-1", "train.batch_size=0", "log.everysteps=3"])
    assert len(lines) == 3


def test_presets_fill_and_file_wins() -> None:
    cfg = load_config(data={**BASE, "preset": "fast"})
    assert cfg.optim.lr == PRESETS["fast"]["optim"]["lr"]
    assert cfg.eval.every_steps == PRESETS["fast"]["eval"]["every_steps"]
    assert cfg.train.max_steps == 10  # the file's value beats the preset's
    cfg = load_config(data={**BASE, "train": {}, "preset": "quality"}, overrides=["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.warmup_steps == PRESETS["quality"]["optim"]["warmup_steps"]
    for name in PRESETS:  # every preset yields a valid config on its own
        load_config(data={**BASE, "train": {}, "preset": name})


def test_yaml_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config(data=BASE, overrides=["optim.lr=1e-3", "lora.target_modules=[q]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(data=BASE)) != config_hash(cfg)


def test_every_field_is_documented() -> None:
    def undocumented(model: type[BaseModel], prefix: str = "") -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                missing += undocumented(ann, f"{prefix}{name}.")
        return missing

    assert undocumented(RunConfig) == []


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"optim": {"lr": 1.0}}
    out = apply_overrides(raw, ["optim.lr=2"])
    assert raw == {"optim": {"lr": 1.0}}
    assert out == {"optim": {"lr": 2}}


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: gpt2\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
