"""`kiln export`: ONNX, TorchScript and pt2, each checked against PyTorch before it is written.

Random-init tiny GPT-2, Llama and T5 models (saved with a BPE tokenizer, loaded by path) give
varied greedy texts, so equal texts mean something; a LoRA run exports merged, without PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import bpe_tokenizer, tiny_config

from kiln.cli import main

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

PROMPTS = ["Recipe for soup", "Ingredients: two eggs", "Preheat the oven to", "Stir in the"]


def _model_dir(root: Path, arch: str) -> Path:
    """A random-init tiny model of `arch` with its tokenizer, saved where load_trained reads."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    corpus = [f"{p} {i} with salt, pepper and water." for i in range(40) for p in PROMPTS]
    tok = bpe_tokenizer(corpus, vocab_size=300)
    vocab, eos, pad = len(tok), tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=64,
                n_embd=32,
                n_layer=2,
                n_head=2,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        )
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        )
    else:
        t5 = T5Config(
            vocab_size=vocab,
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            d_kv=16,
            decoder_start_token_id=pad,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        model = T5ForConditionalGeneration(t5)
    path = root / arch
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "export_report.json").read_text())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_onnx_export_matches_pytorch_logits_and_greedy_text(
    tmp_path: Path, arch: str, prompts_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = _model_dir(tmp_path, arch), tmp_path / "export"
    argv = ["export", str(source), "--out", str(out), "--check-data", str(prompts_file)]
    assert main(argv) == 0, capsys.readouterr().err
    report = _report(out)["formats"]["onnx"]
    assert report["passed"]
    assert [c["case"] for c in report["cases"]] == [
        "batch 1, short",
        "batch 3, long",
        "batch 2, first row padded",
    ]
    shapes = [c["shape"][:2] for c in report["cases"]]
    if arch == "t5":  # no position limit: sources of 5, 96 and 48; decoders half as long
        assert shapes == [[1, 2], [3, 48], [2, 24]]
    else:
        assert shapes == [[1, 5], [3, 64], [2, 32]]
    for case in report["cases"]:
        assert case["max_abs"] <= 1e-4, case
        assert case["argmax_equal"] == 1.0
    print(
        f"{arch}: onnx export {report['export_s']}s, {report['bytes']} bytes, "
        f"max abs {max(c['max_abs'] for c in report['cases']):.2g}"
    )
    assert report["greedy"] == {"prompts": 4, "equal": 4, "texts": report["greedy"]["texts"]}
    texts = report["greedy"]["texts"]
    assert len(set(texts)) > 1, texts  # a random model says different things: a real check
    # Exported with the model's own attention (sdpa: T5's exports too, with kiln's dynamic
    # shapes); the fallback to eager is tested below.
    assert (report["attn_implementation"], "fallback_from" in report) == ("sdpa", False)
    meta = json.loads((out / "kiln_export.json").read_text())
    assert meta["formats"]["onnx"]["attn_implementation"] == report["attn_implementation"]
    assert meta["versions"]["onnxruntime"] is not None
    assert meta["source"]["weights_sha256"]
    # kiln generate on the exported model prints what it prints on the PyTorch model.
    capsys.readouterr()
    for prompt in PROMPTS:
        assert main(["generate", str(source), prompt, "--max-new-tokens", "12"]) == 0
        want = capsys.readouterr().out
        assert (
            main(["generate", "--backend", "onnx", str(out), prompt, "--max-new-tokens", "12"]) == 0
        )
        assert capsys.readouterr().out == want
    # --verify runs the checks again from the directory alone; an absurd atol fails them.
    assert main(["export", "--verify", str(out)]) == 0
    assert main(["export", "--verify", str(out), "--atol", "1e-12"]) == 1


def test_torchscript_and_pt2_round_trips_and_the_models_mode(tmp_path: Path) -> None:
    from kiln.export.graph import Logits, export_graph, load_runner, pytorch_runner
    from kiln.export.parity import cases, compare

    source = _model_dir(tmp_path, "gpt2")
    assert (
        main(["export", str(source), "--format", "torchscript,pt2", "--out", str(tmp_path / "out")])
        == 0
    )
    report = _report(tmp_path / "out")
    assert set(report["formats"]) == {"torchscript", "pt2"}
    for fmt, entry in report["formats"].items():
        assert (tmp_path / "out" / entry["file"]).is_file(), fmt
        assert max(c["max_abs"] for c in entry["cases"]) <= 1e-5
    # Loaded back (save, load, run) at shapes other than the traced one; the mode untouched.
    from transformers import AutoModelForCausalLM

    for training in (False, True):
        model = AutoModelForCausalLM.from_pretrained(source).train(training)
        module = Logits(model, seq2seq=False).train(training)
        flags = [m.training for m in model.modules()]
        for fmt in ("torchscript", "pt2"):
            export_graph(fmt, module, tmp_path, vocab=model.config.vocab_size, context=64, opset=18)
            assert [m.training for m in model.modules()] == flags
        if training:
            continue
        ref = pytorch_runner(module)
        for fmt in ("torchscript", "pt2"):
            run = load_runner(fmt, tmp_path)
            for case in cases(False, model.config.vocab_size, 64):
                got = compare(ref(*case.inputs), run(*case.inputs), case.real)
                assert got["max_abs"] <= 1e-5, (fmt, case.name, got)


def test_an_attention_the_exporter_refuses_falls_back_to_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.export.bundle as bundle

    real = bundle.export_graph

    def refuses_sdpa(fmt: str, module: Any, *args: Any, **kwargs: Any) -> Path:
        if module.model.config._attn_implementation != "eager":
            raise RuntimeError("Failed to decompose the FX graph for ONNX compatibility.")
        return real(fmt, module, *args, **kwargs)

    monkeypatch.setattr(bundle, "export_graph", refuses_sdpa)
    source = _model_dir(tmp_path, "t5")
    out = bundle.export_model(source, ["torchscript"], tmp_path / "out")
    entry = _report(out)["formats"]["torchscript"]
    assert entry["passed"]
    assert entry["attn_implementation"] == "eager"
    assert entry["fallback_from"] == {
        "attn_implementation": "sdpa",
        "why": "Failed to decompose the FX graph for ONNX compatibility.",
    }
    meta = json.loads((out / "kiln_export.json").read_text())
    assert meta["formats"]["torchscript"]["attn_implementation"] == "eager"


def test_a_lora_run_exports_merged_and_a_tight_atol_fails_cleanly(
    tmp_path: Path, recipe_files, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln import Trainer
    from kiln.export import load_runner

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        lora={"enabled": True, "r": 2, "dropout": 0.0},
        train={"max_steps": 4},
        optim={"lr": 1e-2},
    )
    Trainer(cfg).fit()
    run = tmp_path / "run"
    # Out of tolerance: exit 1 naming the case, the report kept beside, no directory.
    assert main(["export", str(run), "--atol", "1e-12"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kiln: error: export failed parity: onnx: out of tolerance at ")
    assert not (run / "export").exists()
    kept = json.loads((run / "export.export_report.json").read_text())
    assert kept["passed"] is False
    assert [p.name for p in run.iterdir() if p.name.startswith(".export")] == []
    # Within tolerance (TorchScript, the quicker export): merged in memory, so no PEFT at
    # inference; it equals kiln merge's model.
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert not (run / "export.export_report.json").exists()
    meta = json.loads((run / "export" / "kiln_export.json").read_text())
    assert meta["lora_merged"] is True
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(
        0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want = merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = load_runner("torchscript", run / "export")(ids.numpy(), np.ones_like(ids.numpy()))
    assert np.abs(got - want).max() <= 1e-4


def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _model_dir(tmp_path, "gpt2")
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["export", str(source), "--format", "onnx,tflite"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kiln: error: --format: tflite given; choose from onnx, torchscript, pt2"
    )
    assert main(["export", str(source)]) == 2  # a model directory has no run to export into
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["export", "--verify", str(source)]) == 2
    assert "not a kiln export" in capsys.readouterr().err
    assert main(["generate", "--backend", "onnx", str(source), "hi"]) == 2
    assert "not a kiln export directory" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # the extra missing
    assert main(["export", str(source), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        "kiln: error: ONNX export needs onnx, onnxscript and onnxruntime: "
        "pip install 'kiln[export]'"
    )


def test_export_on_finish_writes_the_bundle_into_the_run(tmp_path: Path, recipe_files) -> None:
    from kiln import Trainer

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 3},
        export={"on_finish": True, "formats": ["torchscript", "pt2"]},
    )
    Trainer.from_config(cfg).fit()  # with the callbacks the config asks for
    out = tmp_path / "run" / "export"
    report = _report(out)
    assert report["passed"]
    assert sorted(report["formats"]) == ["pt2", "torchscript"]
    meta = json.loads((out / "kiln_export.json").read_text())
    assert meta["source"]["path"] == str(tmp_path / "run" / "final")
    assert meta["parity"]["prompts"][0].startswith("Title:")  # from the run's validation data
    assert main(["export", "--verify", str(out)]) == 0
