"""Hostile inputs to the model loaders and `kiln merge`: nothing the user has is lost, and a bad
path or a corrupt file is one `kiln: error:` line (exit 2), never a traceback.

Every test that feeds the commands user files hashes them before and after the refused or
failed command and checks they are unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_rows, tiny_config, write_jsonl
from transformers import AutoModelForCausalLM

import kiln.models.merge as merge
from kiln import Trainer
from kiln.cli import main
from kiln.errors import KilnError
from kiln.models.load import load_trained

PROMPT = "Title: Lemon"
pytestmark = pytest.mark.slow  # trains two tiny runs (~10 s on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full run with checkpoints at steps 3 and 6, and a LoRA run; never modified by tests."""
    root = tmp_path_factory.mktemp("hostile")
    train = write_jsonl(root / "train.jsonl", make_rows(120, seed=1))
    out = {"data": train}
    for name, extra in {
        "full": {"checkpoint": {"every_steps": 3}},
        "lora": {"lora": {"enabled": True, "r": 4}},
    }.items():
        cfg = tiny_config(root / name, train, None, train={"max_steps": 6}, **extra)
        Trainer(cfg).fit()
        out[name] = root / name / "run"
    return out


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and its symlinks' targets), by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name == ".kiln.lock":  # a lock file says who is using the run, not its data
            continue
        if path.is_symlink():
            found[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `kiln: error:` line on stderr (asserting there is exactly one, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1, err
    return errors[0]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


# ---- kiln merge: OUT never deletes what it merges ------------------------------------------


@pytest.mark.parametrize(
    ("src", "out"),
    [
        ("run", "run/final"),  # the adapter itself
        ("run", "run/final/sub"),  # inside the adapter
        ("run", "run"),  # the run directory given
        ("run", "run/x/../final"),  # the adapter, spelled with ..
        ("run", "link-to-final"),  # the adapter, through a symlink
        ("run", "link-to-run/merged"),  # inside the run directory, through a symlink
        ("run", "."),  # a parent of the run: --overwrite would delete it
        ("run/final", "run"),  # a parent of the adapter given as final/
        ("run/final", "run/merged"),  # inside the run of the final/ given
    ],
)
def test_merge_refuses_out_that_would_delete_the_adapter(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    src: str,
    out: str,
) -> None:
    user = tmp_path / "user"
    copy_run(runs["lora"], user / "run")
    (user / "link-to-final").symlink_to(user / "run" / "final")
    (user / "link-to-run").symlink_to(user / "run")
    before = snapshot(user)
    assert main(["merge", str(user / src), str(user / out), "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "choose another OUT" in line or "choose an OUT outside it" in line
    assert snapshot(user) == before


def test_merge_refuses_out_that_would_delete_the_base_model(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = copy_run(runs["full"] / "final", tmp_path / "base")  # the user's pretrained model
    cfg = tiny_config(
        tmp_path,
        runs["data"],
        None,
        model={"arch": None, "name_or_path": str(base)},
        tokenizer={},
        lora={"enabled": True, "r": 2},
        train={"max_steps": 3},
    )
    Trainer(cfg).fit()
    before = snapshot(base)
    assert main(["merge", str(tmp_path / "run"), str(base), "--overwrite"]) == 2
    assert "the adapter's base model" in one_error_line(capsys)
    assert snapshot(base) == before


def test_merge_failure_mid_write_leaves_out_as_it_was(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(runs["lora"], tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"the": "user\'s previous merge"}')
    (out / "notes.txt").write_text("keep me")
    before_run, before_out = snapshot(run), snapshot(out)
    write = merge._write_merged

    def disk_full(model, tokenizer, cfg, where: Path) -> None:
        write(model, tokenizer, cfg, where)  # the merged model is in staging; then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "_write_merged", disk_full)
    assert main(["merge", str(run), str(out), "--overwrite"]) == 5  # EXIT_STORAGE_FULL
    assert "no space left on device while writing the merged model" in one_error_line(capsys)
    assert snapshot(out) == before_out
    assert snapshot(run) == before_run

    def crash(model, tokenizer, cfg, where: Path) -> None:
        where.mkdir()
        (where / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-merge")

    monkeypatch.setattr(merge, "_write_merged", crash)
    with pytest.raises(RuntimeError, match="killed mid-merge"):
        merge.merge_adapter(run, out, overwrite=True)
    assert snapshot(out) == before_out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging left


def test_merge_over_an_existing_file_needs_overwrite_and_replaces_it_whole(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(runs["lora"], tmp_path / "run")
    out = tmp_path / "out"
    out.write_text("a file the user cares about")
    before, before_run = snapshot(tmp_path), snapshot(run)
    assert main(["merge", str(run), str(out)]) == 2
    assert "already exists" in one_error_line(capsys)
    assert snapshot(tmp_path) == before

    # --overwrite that fails half-way: the file is still there, whole.
    def fail(model, tokenizer, cfg, where: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(merge, "_write_merged", fail)
        assert main(["merge", str(run), str(out), "--overwrite"]) == 2
    assert "Permission denied" in one_error_line(capsys)
    assert snapshot(tmp_path) == before

    assert main(["merge", str(run), str(out), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging left
    assert snapshot(run) == before_run


def test_merge_out_whose_parent_cannot_be_created_is_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(runs["lora"], tmp_path / "run")
    (tmp_path / "a-file").write_text("not a directory")
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(tmp_path / "a-file" / "sub" / "out")]) == 2
    assert "cannot create its parent directory" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


# ---- corrupt model files: one line, through train, generate and eval --------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tokenizer_not_a_tokenizer(path: Path) -> None:
    # Valid JSON, wrong schema: the tokenizers library answers with a bare Exception.
    tok = json.loads(path.read_text())
    tok["model"] = 3
    path.write_text(json.dumps(tok))


CORRUPTIONS = {
    "safetensors-truncated": ("model.safetensors", _truncate),
    "safetensors-garbage": ("model.safetensors", lambda p: p.write_bytes(b"garbage! " * 999)),
    "config-json-garbage": ("config.json", lambda p: p.write_bytes(b"\xff\xfe{{not json")),
    "config-json-truncated": ("config.json", _truncate),
    "tokenizer-json-truncated": ("tokenizer.json", _truncate),
    "tokenizer-json-not-a-tokenizer": ("tokenizer.json", _tokenizer_not_a_tokenizer),
}


def _corrupt_model(runs: dict[str, Path], dest: Path, corruption: str) -> Path:
    """The full run's final/ (a transformers model directory) copied and corrupted."""
    model = copy_run(runs["full"] / "final", dest)
    name, corrupt = CORRUPTIONS[corruption]
    corrupt(model / name)
    return model


def _train_config(tmp_path: Path, model: Path, data: Path) -> Path:
    raw = {
        "output_dir": str(tmp_path / "new-run"),
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "batch_size": 4},
        "log": {"progress": "none", "plots": False},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_corrupt_model_files_are_one_line(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    corruption: str,
) -> None:
    model = _corrupt_model(runs, tmp_path / "model", corruption)
    before = snapshot(model)
    args = {
        "generate": ["generate", str(model), PROMPT, "--max-new-tokens", "4"],
        "eval": ["eval", str(model), "--data", str(runs["data"]), "--max-batches", "1"],
        "train": ["train", str(_train_config(tmp_path, model, runs["data"]))],
    }[command]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert str(model) in line
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("adapter_model.safetensors", _truncate),
        ("adapter_config.json", lambda p: p.write_text("[1, 2]")),
        ("kiln_config.yaml", lambda p: p.write_text("model: [unclosed")),
        ("kiln_base.json", lambda p: p.write_text("{}")),
    ],
)
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_corrupt_adapter_files_are_one_line(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    name: str,
    corrupt,
) -> None:
    run = copy_run(runs["lora"], tmp_path / "run")
    corrupt(run / "final" / name)
    before = snapshot(run)
    args = {
        "generate": ["generate", str(run), PROMPT, "--max-new-tokens", "4"],
        "merge": ["merge", str(run), str(tmp_path / "merged")],
    }[command]
    assert main(args) == 2
    assert str(run / "final") in one_error_line(capsys)
    assert snapshot(run) == before
    assert not (tmp_path / "merged").exists()


# ---- checkpoints that fail their checksums are never loaded --------------------------------


def _flip_bytes(path: Path) -> None:
    """Corrupt the tensor data (the end of the file) in place: same size, valid header."""
    data = bytearray(path.read_bytes())
    for i in range(1, 65):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_generate_skips_a_checkpoint_that_fails_its_checksum(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run without final/ (killed after its checkpoints): generate resolves to a checkpoint.
    run = tmp_path / "run"
    shutil.copytree(runs["full"] / "checkpoints", run / "checkpoints")
    newest, older = run / "checkpoints" / "step-6", run / "checkpoints" / "step-3"
    _flip_bytes(newest / "model.safetensors")
    before = snapshot(run)

    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert load_trained(run).path == older
    assert any("step-6" in r.getMessage() for r in caplog.records)
    args = [PROMPT, "--max-new-tokens", "8"]
    assert main(["generate", str(older), *args]) == 0
    from_older = capsys.readouterr().out
    assert main(["generate", str(run), *args]) == 0
    assert capsys.readouterr().out == from_older

    # Named explicitly, the corrupt checkpoint is refused (generate and eval alike).
    assert main(["generate", str(newest), *args]) == 2
    line = one_error_line(capsys)
    assert str(newest / "model.safetensors") in line
    assert "corrupt" in line
    eval_args = ["eval", str(newest), "--data", str(runs["data"]), "--max-batches", "1"]
    assert main(eval_args) == 2
    assert "corrupt" in one_error_line(capsys)

    # Every checkpoint corrupt: nothing is loaded.
    _flip_bytes(older / "model.safetensors")
    before = snapshot(run)
    assert main(["generate", str(run), *args]) == 2
    assert "no checkpoint that passes its checksums" in one_error_line(capsys)
    with pytest.raises(KilnError, match="no checkpoint that passes"):
        load_trained(run)
    assert snapshot(run) == before


def test_eval_refuses_a_report_path_that_is_its_data(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shutil.copy(runs["data"], tmp_path / "val.jsonl")
    before = snapshot(tmp_path)
    args = ["eval", str(runs["full"]), "--data", str(data), "--max-batches", "1"]
    assert main([*args, "--out", str(tmp_path / "x" / ".." / "val.jsonl")]) == 2
    assert "is the --data file" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
