"""`kiln export` as a hostile user meets it (issue 26, items 15-18): every bad --out, opset,
atol or damaged export directory is one `kiln: error:` line naming what is wrong, exit 2, and
nothing of the user's is touched.

Checks that fail before a model loads use a directory holding only config.json; the damaged
exports are copies of one tiny GPT-2 export (ONNX and TorchScript), built once per session
(`bundle_for`), which tests/test_fuzz_export.py damages in many more ways.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import bpe_tokenizer

from kiln.cli import main

pytest.importorskip("onnxruntime")

OPSET_ASKED = 13
"""The bundle's --opset: below what the exporter writes natively (18), so what is recorded
must be read back from the file."""


def bundle_for(factory: pytest.TempPathFactory) -> Path:
    """A valid export of a tiny random GPT-2 (onnx + torchscript, 2 prompts of 4 tokens),
    built once per session (the ONNX export takes seconds) and copied by each test."""
    from test_export import _model_dir

    from kiln.export import export_model

    root = factory.getbasetemp() / "kiln-export-bundle"
    out = root / "export"
    if not (out / "kiln_export.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        export_model(
            _model_dir(root, "gpt2"),
            ["onnx", "torchscript"],
            out,
            opset=OPSET_ASKED,
            prompts=2,
            max_new_tokens=4,
        )
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle_for(tmp_path_factory)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "export"))


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kiln: error: "), err
    return err[0]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A model directory to name as the source: nothing loads before --out is checked."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


# ---- item 15: --out ----------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_item15_out_a_file_is_refused_and_the_file_kept(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: bool
) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    argv = ["export", str(source), "--out", str(target), "--format", "torchscript"]
    assert main(argv + ["--overwrite"] * overwrite) == 2
    assert _one_error(capsys) == f"kiln: error: --out: {target} exists and is not a directory"
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt"]


def test_item15_out_where_nothing_can_be_written(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, parent in ((Path("/proc/x"), "/proc"), (afile / "sub", str(afile))):
        if not out.parent.exists():
            continue
        assert main(["export", str(source), "--out", str(out)]) == 2
        assert _one_error(capsys).startswith(f"kiln: error: --out: cannot write in {parent}: ")
    assert afile.read_text() == "mine"


def test_item15_overwrite_replaces_only_an_earlier_export(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    argv = ["export", str(source), "--out", str(home), "--overwrite", "--format", "torchscript"]
    assert main(argv) == 2
    assert "is not an export (no kiln_export.json)" in _one_error(capsys)
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- item 16: a BERT config with a BPE tokenizer.json ---------------------------------------


@pytest.mark.slow
def test_item16_bert_with_a_bpe_tokenizer_exports_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import BertConfig, BertLMHeadModel

    tok = bpe_tokenizer([f"Recipe {i} with salt and water." for i in range(60)], 300)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    source = tmp_path / "bert"
    BertLMHeadModel(config).save_pretrained(source)
    tok.save_pretrained(source)
    # As a hand-made or older model directory has it: no tokenizer class, so transformers
    # picks BERT's (WordPiece) from config.json and rebuilds the BPE tokenizer.json as one.
    tok_config = source / "tokenizer_config.json"
    tok_config.write_text(
        json.dumps(
            {k: v for k, v in json.loads(tok_config.read_text()).items() if k != "tokenizer_class"}
        )
    )
    out = tmp_path / "out"
    argv = ["export", str(source), "--out", str(out), "--format", "torchscript", "--prompts", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["export", "--verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verify: passed")
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"  # exported as it was saved


# ---- item 17: --verify of a damaged export ---------------------------------------------------


def _unseal(export: Path) -> None:
    """An export as written before kiln_export.json listed its files: damage is found by
    loading, not by checksums."""
    meta_file = export / "kiln_export.json"
    meta = json.loads(meta_file.read_text())
    meta.pop("files")
    meta.pop("meta_sha256")
    meta_file.write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "meta {}": (
        lambda e: (e / "kiln_export.json").write_text("{}"),
        "kiln_export.json: damaged: formats: required key is missing (and 2 more problems)",
    ),
    "meta []": (
        lambda e: (e / "kiln_export.json").write_text("[]"),
        "kiln_export.json: damaged: expected a JSON object, got list",
    ),
    "parity missing": (
        lambda e: (e / "parity.safetensors").unlink(),
        "parity.safetensors: missing (the export wrote ",
    ),
    "parity truncated": (
        lambda e: _truncate(e / "parity.safetensors"),
        "parity.safetensors: damaged: truncated to ",
    ),
    "model.onnx truncated": (
        lambda e: _truncate(e / "model.onnx"),
        "model.onnx: damaged: truncated to ",
    ),
    "tokenizer missing": (
        lambda e: (e / "tokenizer.json").unlink(),
        "tokenizer.json: missing (the export wrote ",
    ),
}
UNSEALED = {
    "parity missing": "parity.safetensors: missing (it holds the parity inputs",
    "parity truncated": "parity.safetensors: damaged: not a readable safetensors file",
    "model.onnx truncated": "model.onnx: onnxruntime ",
    "tokenizer missing": "tokenizer.json: missing (the export wrote it)",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "sealed"),
    [(d, True) for d in DAMAGE] + [(d, False) for d in UNSEALED],
    ids=[f"{d}, sealed" for d in DAMAGE] + [f"{d}, unsealed" for d in UNSEALED],
)
def test_item17_verify_names_the_damaged_file(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, sealed: bool
) -> None:
    export = _copy(bundle, tmp_path)
    if not sealed:
        _unseal(export)
    damage_it, sealed_message = DAMAGE[damage]
    damage_it(export)
    assert main(["export", "--verify", str(export)]) == 2
    expected = sealed_message if sealed else UNSEALED[damage]
    assert _one_error(capsys).startswith(f"kiln: error: {export}/{expected}")


@pytest.mark.slow
def test_item17_an_edited_value_in_kiln_export_json_is_damage_not_a_parity_failure(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = _copy(bundle, tmp_path)
    meta_file = export / "kiln_export.json"
    # One more token to decode: the texts would differ from the references (exit 1) though
    # the model is intact; the checksum says the file changed instead.
    meta_file.write_text(
        meta_file.read_text().replace('"max_new_tokens": 4', '"max_new_tokens": 5')
    )
    assert main(["export", "--verify", str(export)]) == 2
    assert "kiln_export.json: damaged: its content does not match its checksum" in _one_error(
        capsys
    )


# ---- item 18: --opset, --atol, the verify summary -----------------------------------------


@pytest.mark.parametrize("opset", ["999", "0", "-3"])
def test_item18_an_opset_the_exporter_cannot_write_is_one_line(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], opset: str
) -> None:
    from kiln.export.graph import opset_range

    low, high = opset_range()
    argv = ["export", str(source), "--out", str(tmp_path / "o"), f"--opset={opset}"]
    assert main(argv) == 2
    assert _one_error(capsys) == (
        f"kiln: error: --opset: {opset} is not an opset this torch "
        f"and onnx can write; choose {low} to {high}"
    )
    assert 7 <= low <= 18 <= high
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_item18_the_opset_recorded_is_the_one_written(bundle: Path) -> None:
    from kiln.export.graph import written_opset

    written = written_opset(bundle / "model.onnx")
    meta = json.loads((bundle / "kiln_export.json").read_text())
    report = json.loads((bundle / "export_report.json").read_text())
    assert meta["opset"] == report["formats"]["onnx"]["opset"] == written
    # The exporter writes 18 natively and could not convert this model down to 13.
    assert (OPSET_ASKED, written) == (13, 18)


@pytest.mark.slow
@pytest.mark.parametrize("atol", ["-1", "0", "nan", "inf"])
def test_item18_verify_with_a_bad_atol_is_bad_input(
    bundle: Path, capsys: pytest.CaptureFixture[str], atol: str
) -> None:
    assert main(["export", "--verify", str(bundle), f"--atol={atol}"]) == 2
    shown = f"{float(atol):g}"
    assert _one_error(capsys) == f"kiln: error: --atol: must be a finite number > 0, got {shown}"


@pytest.mark.slow
def test_item18_verify_prints_a_line_per_check_and_the_json_behind_a_flag(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--verify", str(bundle)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cases = ["batch 1, short", "batch 3, long", "batch 2, first row padded"]
    want = [
        f"{fmt}: {case}: max abs diff "
        for fmt in ("onnx", "torchscript")
        for case in [*cases, "greedy decoding"]
    ]
    assert len(lines) == len(want) + 1, lines
    for line, start in zip(lines, want, strict=False):
        assert line.startswith(
            start.replace(": greedy decoding: max abs diff ", ": greedy decoding: 2 of 2 ")
        ), line
        assert line.endswith(": ok"), line
    assert lines[-1].startswith("verify: passed (onnx, torchscript) with torch ")
    assert main(["export", "--verify", str(bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert sorted(report["formats"]) == ["onnx", "torchscript"]
    # Failing: the lines say which check, stderr the one line, exit 1.
    assert main(["export", "--verify", str(bundle), "--atol", "1e-15"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out.splitlines()[0]
    assert captured.out.strip().splitlines()[-1].startswith("verify: FAILED")
    assert captured.err.strip() == f"kiln: error: {bundle}: parity fails for onnx"


@pytest.mark.slow
def test_item18_verify_json_stays_json_when_a_difference_is_infinite(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.numpy import load_file, save_file

    export = _copy(bundle, tmp_path)
    _unseal(export)
    saved = load_file(str(export / "parity.safetensors"))
    saved["case0.logits"] = saved["case0.logits"][..., :-1].copy()  # one vocab entry short
    save_file(saved, str(export / "parity.safetensors"))
    assert main(["export", "--verify", str(export), "--json"]) == 1
    out = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert report["formats"]["onnx"]["cases"][0]["max_abs"] is None
    assert report["passed"] is False


def test_item18_export_on_finish_with_an_opset_out_of_range_is_refused_before_training(
    tmp_path: Path, recipe_files
) -> None:
    from helpers import tiny_config

    from kiln import Trainer
    from kiln.errors import KilnError

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 3},
        export={"on_finish": True, "formats": ["onnx"], "opset": 29},
    )
    with pytest.raises(KilnError, match=r"^export\.opset: 29 is not an opset .* choose 7 to \d+$"):
        Trainer.from_config(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a step was taken
