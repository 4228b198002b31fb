"""The `kiln` command: shipped configs validate, errors are one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_rows, write_jsonl

from kiln.cli import main
from kiln.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_every_shipped_config_validates() -> None:
    # Found recursively; the count guards against a glob that silently matches less.
    assert len(SHIPPED) >= 5, SHIPPED
    for path in SHIPPED:
        load_config(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_validate_command(
    path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # validate also checks what a config names (kiln.preflight): its data, relative to the
    # repository, and the extras it needs.
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    if cfg.lora.enabled:
        pytest.importorskip("peft")
    overrides = []
    base = cfg.model.name_or_path
    if base is not None and base.startswith("runs/"):  # starts from another shipped run
        if not (ROOT / base).is_dir():  # (a fresh clone): refused, naming it, until it exists
            assert main(["config", "validate", str(path)]) == 2
            assert f"model.name_or_path: cannot load {base!r}" in capsys.readouterr().err
        from transformers import GPT2Config

        GPT2Config().save_pretrained(tmp_path)  # a stand-in for the run's final/
        overrides.append(f"model.name_or_path={tmp_path}")
    assert main(["config", "validate", str(path), *overrides]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bad_override_exits_2_with_one_line_and_no_traceback() -> None:
    proc = run_cli("train", "configs/quickstart.yaml", "optim.lr=-1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "kiln: error: configs/quickstart.yaml: optim.lr: input should be greater than 0 (got -1)"
    ]
    assert "Traceback" not in proc.stderr


def test_unknown_key_and_mistyped_value_each_name_their_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    raw["train"]["max_stepz"] = 10
    raw["optim"]["lr"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"kiln: error: {path}: optim.lr: input should be a valid number, unable to parse "
        "string as a number (got 'fast')",
        f"kiln: error: {path}: train.max_stepz: unknown key; did you mean train.max_steps?",
    ]


def test_missing_config_and_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["train"]) == 2  # CONFIG may be left out only with --resume RUN_DIR
    assert "give a CONFIG, or --resume RUN_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "c.yaml", "--no-such-option"])
    assert info.value.code == 2


def test_bad_data_row_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(30))
    with data.open("a") as f:
        f.write('{"text": "ok"}\n{not json\n')
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "data": {"train": str(data)},
        "train": {"max_steps": 2},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{data}:32: invalid JSON" in err[0]
    # The run directory holds only status.json: failed, with the same line and exit code.
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name != ".kiln.lock") == ["status.json"]
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 2)
    assert status["error"] == err[0].removeprefix("kiln: error: ")
    # ... and it does not stand in the way of the corrected run.
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(30)))
    assert main(["-q", "train", str(path), "data.max_length=32"]) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_explain_shows_derived_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "explain", "configs/quickstart.yaml", "train.grad_accum_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "effective batch size:      32 sequences (16 x 2 accumulation)" in out
    assert "tokens per optimizer step: 8,192 (packed blocks of 256)" in out
    assert "total optimizer steps:     350 (train.max_steps)" in out
    assert "lr: 0.002  # Peak learning rate." in out
    assert "# learning rate (cosine)" in out
    assert "distributed:               " not in out  # one process
    args = ["config", "explain", "configs/quickstart.yaml", "--nproc", "4"]
    assert main([*args, "train.distributed.strategy=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "effective batch size:      64 sequences (16 x 1 accumulation x 4 ranks)" in out
    assert "distributed:               fsdp on 4 ranks (each holds 1/4" in out


def test_explain_prints_lists_of_sections(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "config",
        "explain",
        "configs/quickstart.yaml",
        "data.packing=false",
        "data.augment=[{name: recipe_tip, p: 0.2}]",
        "data.curriculum={stages: [{until: 1, max_difficulty: 2}, {}]}",
        "notify.senders=[{kind: webhook, url_env: KILN_HOOK}]",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "augment: [{name: recipe_tip, options: {}, p: 0.2}]" in out
    assert "senders: [{kind: webhook" in out
    assert "max_difficulty: 2.0" in out or "{max_difficulty: 2.0, until: 1}" in out


def test_explain_counts_steps_from_epochs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(200))
    cfg = {
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": str(data), "val_split": 0.1, "max_length": 64},
        "train": {"num_epochs": 2, "batch_size": 4},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["config", "explain", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("total optimizer steps"))
    assert "2.0 epochs x" in line
    steps = int(line.split(":")[1].split("(")[0].replace(",", ""))
    per_epoch = int(line.split("x ")[1].split(" batches")[0])
    assert steps == 2 * per_epoch > 0


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "explain", "configs/quickstart.yaml", "train.max_steps=100"]
    assert main([*argv, "train.batch_size=4"]) == 0
    assert "4 sequences (4 x 1 accumulation)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--bogus"])


def test_data_preview_counts_and_marks_the_unlearned_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = make_rows(60)
    rows.append(dict(rows[0]))  # an exact duplicate
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = {
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": str(data), "val_split": 0.1, "max_length": 32, "min_quality_score": 0.2},
        "train": {"max_steps": 2},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "preview", str(path), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    dropped = sum(r["quality_score"] < 0.2 for r in rows[:60])
    assert "read               61" in out
    assert f"dropped: low_quality {dropped}" in out.replace("  ", " ")
    assert "dropped: duplicate 1" in out.replace("  ", " ")
    assert "--- train example 1 ---" in out
    assert "packed into" in out
    assert "⟦" in out  # the first token of a block is never a target
