"""Hostile configs: each is one line per problem naming the key (exit 2), never a traceback,
a hang or a huge allocation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.cli import main
from kiln.config import ConfigError, RunConfig, Section, dump_yaml, load_config
from kiln.config.base import short_repr, union_members

BASE = {
    "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "data": {"train": "train.jsonl"},
    "train": {"max_steps": 10},
}
BASE_YAML = yaml.safe_dump(BASE)


def problems(overrides: list[str], data: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data=data or BASE, overrides=overrides)
    lines = info.value.problems
    assert all("\n" not in line and len(line) < 400 for line in lines), lines
    return lines


def file_problems(path: Path, text: str | bytes) -> list[str]:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}") and len(line) < 400 for line in lines), lines
    return lines


def fields(model: type[Section] = RunConfig, prefix: str = "") -> Iterator[tuple[str, list[Any]]]:
    """(dotted key, annotation alternatives) of every field a dotted override can reach."""
    for name, info in model.model_fields.items():
        leaves = union_members(info.annotation)
        sections = [x for x in leaves if isinstance(x, type) and issubclass(x, Section)]
        if sections:
            yield from fields(sections[0], f"{prefix}{name}.")
        else:
            yield prefix + name, leaves


def _numeric(leaves: list[Any], kind: type) -> bool:
    return kind in leaves and bool not in leaves


FLOAT_KEYS = [key for key, leaves in fields() if _numeric(leaves, float)]
INT_KEYS = [key for key, leaves in fields() if _numeric(leaves, int)]


# 1. YAML-level failures -------------------------------------------------------------------


def test_non_utf8_config_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    lines = file_problems(path, b"\xff\xfe\x00name: x")
    assert lines == [f"{path}: not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"]
    capsys.readouterr()
    assert main(["config", "validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"kiln: error: {lines[0]}"]
    # A UTF-8 byte-order mark is fine.
    path.write_bytes(b"\xef\xbb\xbf" + BASE_YAML.encode())
    assert load_config(path).train.max_steps == 10


def test_deeply_nested_yaml_is_refused_without_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for text in ("[" * 100_000, "{a: " * 100_000, BASE_YAML + "x:\n" + "- " * 5000 + "1\n"):
        (line,) = file_problems(path, text)
        assert "nested deeper than 64 levels" in line, line


def _laughs(levels: int, anchor_key: str = "l") -> str:
    """YAML whose last anchor expands to 9**levels values through shared aliases."""
    lines = [f"{anchor_key}0: &{anchor_key}0 [a, a, a, a, a, a, a, a, a]"]
    for i in range(1, levels):
        refs = ", ".join([f"*{anchor_key}{i - 1}"] * 9)
        lines.append(f"{anchor_key}{i}: &{anchor_key}{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    # 9**7 = 4.8M values: refused as it loads, before validation or an error message walks it.
    bomb = "bomb:\n" + "".join(f"  {line}\n" for line in _laughs(7).splitlines())
    for text in (_laughs(7), BASE_YAML + bomb + "log: {every_steps: *l6}\n"):
        start = time.perf_counter()
        lines = file_problems(path, text)
        assert time.perf_counter() - start < 5
        assert len(lines) == 1
    assert "aliases expand it to more than 100000 values" in file_problems(path, _laughs(7))[0]
    # An alias that holds itself would make a cyclic config (dump_yaml would fail later).
    cyclic = BASE_YAML.replace("data:\n", "data:\n  augment: [{name: x, options: &a {k: *a}}]\n")
    assert "an alias refers to a value that holds it" in file_problems(path, cyclic)[0]
    # Aliases nesting deeper than the limit, each anchor shallow.
    deep = "a0: &a0 " + "[" * 40 + "]" * 40 + "\na1: &a1 " + "[" * 30 + "*a0" + "]" * 30 + "\n"
    assert "aliases nest it deeper than 64 levels" in file_problems(path, deep)[0]


def test_modest_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        BASE_YAML + "eval: &cadence {every_steps: 5}\ncheckpoint: {<<: *cadence, keep_last: 2}\n"
    )
    cfg = load_config(path)
    assert cfg.checkpoint.every_steps == 5
    assert yaml.safe_load(dump_yaml(cfg))["checkpoint"]["keep_last"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE_YAML + "1: x\n", "top level: key 1 is not a string"),
        (BASE_YAML + "null: x\n", "top level: key None is not a string"),
        (
            BASE_YAML.replace("max_steps: 10", "max_steps: 10\n  1: 2"),
            "train: key 1 is not a string",
        ),
        (BASE_YAML + "[a]: x\n", "a key must be a string, not a list or a mapping"),
        (BASE_YAML + "optim: {[a]: 1}\n", "a key must be a string, not a list or a mapping"),
        (BASE_YAML + "preset: [fast]\n", "preset: unknown preset ['fast']"),
        (BASE_YAML + "name: 2024-02-30\n", "cannot read '2024-02-30' as timestamp"),
    ],
)
def test_non_string_keys_and_odd_values_are_one_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    lines = file_problems(tmp_path / "c.yaml", text)
    assert any(expected in line for line in lines), lines


def test_huge_integer_literals_do_not_break_error_messages(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    # Over Python's 4300-digit int/str limit: refused by the loader, with file:line.
    (line,) = file_problems(path, BASE_YAML.replace("max_steps: 10", "max_steps: " + "9" * 5000))
    text = BASE_YAML.replace("max_steps: 10", "max_steps: " + "9" * 5000)
    lineno = text.splitlines().index("  max_steps: " + "9" * 5000) + 1
    assert line.startswith(f"{path}:{lineno}: invalid YAML: cannot read '99999")
    assert "as int" in line
    # Under it: validated, and the echoed input is cut short.
    (line,) = file_problems(path, BASE_YAML.replace("max_steps: 10", "max_steps: " + "9" * 4000))
    assert line.startswith(f"{path}: train.max_steps: input should be less than or equal to")
    assert line.endswith("(got <integer of 4000 digits>)")
    (line,) = problems(["train.max_steps=" + "9" * 5000])
    assert line.startswith("train.max_steps: unable to parse input string as an integer")
    assert line.endswith("(got '999999999999999999999999999...9999999999999999999999999999')")
    assert problems(["train.max_steps=1e400"]) == [
        "train.max_steps: input should be a finite number (got inf)"
    ]
    (line,) = problems(["train.device=" + "x" * 10_000])
    assert len(line) < 120


def test_short_repr_is_bounded_for_any_value() -> None:
    shared: list[Any] = ["x"] * 9
    for _ in range(12):  # 9**13 values, shared
        shared = [shared] * 9
    assert len(short_repr(shared)) <= 60
    assert short_repr(10**5000) == "<integer of 5001 digits>"
    assert short_repr(-(10**4000) + 1) == "<integer of 4000 digits>"
    assert len(short_repr("y" * 1000)) <= 60


def test_cli_bad_config_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    raw = {**BASE, "name": "../../etc", "optim": {"lr": float("inf")}, "train": {"max_steps": True}}
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert all(line.startswith(f"kiln: error: {path}: ") for line in err)
    assert "Traceback" not in "\n".join(err)
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == err
    path.write_bytes(b"\xff" * 3)
    assert main(["train", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


# 2. inf and nan ---------------------------------------------------------------------------


def test_every_float_field_rejects_inf_and_nan() -> None:
    assert len(FLOAT_KEYS) >= 20, FLOAT_KEYS  # the walk found the fields (data's included)
    for key in FLOAT_KEYS:
        for value in (".inf", "-.inf", ".nan"):
            lines = problems([f"{key}={value}"])
            assert any(
                line.startswith(f"{key}: input should be a finite number") for line in lines
            ), (
                key,
                lines,
            )
    assert problems(["optim.betas=[.nan, 0.9]"]) == [
        "optim.betas.0: input should be a finite number (got nan)"
    ]
    assert problems(["data.augment=[{name: x, p: .nan}]"])[0].startswith("data.augment.0.p: ")


# 3. true/false for numbers ----------------------------------------------------------------


def test_booleans_are_not_numbers() -> None:
    assert len(INT_KEYS) >= 30, INT_KEYS
    for key in INT_KEYS:
        assert f"{key}: expected an integer, got true" in problems([f"{key}=true"]), key
    for key in FLOAT_KEYS:
        assert f"{key}: expected a number, got false" in problems([f"{key}=false"]), key
    assert problems(["optim.betas=[0.9, true]"]) == ["optim.betas.1: expected a number, got true"]
    # Every problem of the section is still reported, with the bool.
    lines = problems(["train.max_steps=true", "train.batch_size=0"])
    assert sorted(lines) == [
        "train.batch_size: input should be greater than 0 (got 0)",
        "train.max_steps: expected an integer, got true",
    ]


def test_booleans_and_ints_still_fit_their_fields() -> None:
    cfg = load_config(
        data=BASE,
        overrides=["train.tf32=false", "optim.fused=true", "optim.lr=1", "train.num_epochs=2"],
    )
    assert (cfg.train.tf32, cfg.optim.fused) == (False, True)
    assert (cfg.optim.lr, cfg.train.num_epochs) == (1.0, 2.0)


# 4. upper bounds --------------------------------------------------------------------------


def test_sizes_have_upper_bounds() -> None:
    keys = list(INT_KEYS)
    assert len(keys) >= 30, keys
    for key in keys:
        lines = problems([f"{key}={10**20}"])
        assert any(line.startswith(f"{key}: input should be less than") for line in lines), (
            key,
            lines,
        )
    assert problems(["model.max_position_embeddings=1000000000000"]) == [
        "model.max_position_embeddings: input should be less than or equal to 1048576 "
        "(got 1000000000000)"
    ]
    assert problems(["train.num_epochs=1e7"])[0].startswith("train.num_epochs: input should be")


def test_absurd_from_scratch_model_is_refused() -> None:
    wide = ["model.hidden_size=65536", "model.num_layers=1024", "model.num_heads=1024"]
    (line,) = problems(wide)
    assert line.startswith("model: about 7.0e+13 parameters from model.hidden_size")
    assert "at most 1e+12" in line
    # A pretrained model's size is its own; the estimate is for arch only.
    pretrained = {**BASE, "model": {"name_or_path": "gpt2", "hidden_size": 65536}}
    load_config(data=pretrained, overrides=["model.num_layers=1024", "model.num_heads=1024"])


# 5. run name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../etc", "..", ".", "...", ".hidden", "a/b", "a\\b", "", "a" * 129, "é", "a b"]
)
def test_run_name_must_be_one_safe_path_component(name: str) -> None:
    assert problems([], {**BASE, "name": name}) == [
        "name: must be one path component of letters, digits, '.', '_' or '-' "
        "(use output_dir to choose a place)"
    ]


def test_safe_run_names_and_free_output_dir_are_accepted() -> None:
    for name in ("quickstart", "exp-1.2_b", "A", "a..b", "a" * 128):
        assert load_config(data={**BASE, "name": name}).run_dir == Path("runs") / name
    assert load_config(data={**BASE, "output_dir": "../elsewhere/x"}).run_dir == Path(
        "../elsewhere/x"
    )


# 6. secrets -------------------------------------------------------------------------------

SECRET = "f93062a1b2c3d4e5f60718293a4b5c6d"


@pytest.mark.parametrize(
    "sender",
    [
        {"kind": "twilio", "auth_token_env": SECRET},
        {"kind": "twilio", "to_env": 15550001111},
        {"kind": "slack", "url_env": f"https://hooks.slack.com/services/{SECRET}"},
        {"kind": "webhook", "token_env": "kiln_hook_token"},
        {"kind": "discord", "url_env": "A" * 129},
    ],
)
def test_env_names_must_look_like_env_names_and_are_never_echoed(sender: dict[str, Any]) -> None:
    (line,) = problems([], {**BASE, "notify": {"senders": [sender]}})
    key = next(k for k in sender if k != "kind")
    assert line.startswith(f"notify.senders.0.{sender['kind']}.{key}: must be the name of an")
    assert str(sender[key])[:8] not in line


def test_conventional_env_names_are_accepted() -> None:
    senders = [{"kind": "webhook", "url_env": "_HOOK", "token_env": "KILN_HOOK_TOKEN_2"}]
    cfg = load_config(data={**BASE, "notify": {"senders": senders}})
    assert cfg.notify.senders[0].token_env == "KILN_HOOK_TOKEN_2"


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{SECRET}@mlflow.example.com",
        f"https://{SECRET}@mlflow.example.com",
        f"https://mlflow.example.com/?access_token={SECRET}",
        f"https://mlflow.example.com/?Token={SECRET}",
        f"https://mlflow.example.com/x?page=1&api_key={SECRET}",
        f"https://blob.example.com/x?sv=1&sig={SECRET}",
        f"https://s3.example.com/x?X-Amz-Signature={SECRET}",
        f"https://mlflow.example.com/#access_token={SECRET}",
    ],
)
def test_urls_with_credentials_are_refused_without_echo(url: str) -> None:
    for override in (
        f"log.mlflow.tracking_uri='{url}'",
        f"notify.senders=[{{kind: twilio, api_url: '{url}'}}]",
    ):
        (line,) = problems([override])
        assert "holds " in line, line
        assert SECRET not in line
        assert line.startswith(("log.mlflow.tracking_uri: ", "notify.senders.0.twilio.api_url: "))


def test_plain_urls_are_accepted() -> None:
    for uri in ("sqlite:///runs/x/mlflow.db", "file:/tmp/mlruns", "http://localhost:5000/?page=2"):
        load_config(data=BASE, overrides=[f"log.mlflow.tracking_uri={uri}"])
    cfg = load_config(
        data=BASE, overrides=["notify.senders=[{kind: twilio, api_url: 'http://127.0.0.1:8080'}]"]
    )
    assert cfg.notify.senders[0].api_url == "http://127.0.0.1:8080"
    assert (
        "http:// or https://" in problems(["notify.senders=[{kind: twilio, api_url: ftp://x}]"])[0]
    )
