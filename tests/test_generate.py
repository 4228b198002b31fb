"""`kiln generate`: greedy, sampling and beams, for full runs, checkpoints, adapters and T5."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_rows, tiny_config, write_jsonl

from kiln import Trainer
from kiln.cli import main
from kiln.errors import KilnError
from kiln.models.generation import GenerationOptions, generate_texts
from kiln.models.load import load_trained

PROMPT = "Title: Lemon"
pytestmark = pytest.mark.slow  # trains three tiny runs (~10-30 s on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    train = write_jsonl(root / "train.jsonl", make_rows(120, seed=1))
    out = {}
    for name, extra in {
        "full": {"checkpoint": {"every_steps": 3}},
        "lora": {"lora": {"enabled": True, "r": 4}},
        "t5": {
            "task": "seq2seq",
            "model": {"arch": "t5"},
            "data": {"source_template": "{title}", "target_template": "{text}"},
        },
    }.items():
        cfg = tiny_config(
            root / name, train, None, train={"max_steps": 6}, optim={"lr": 1e-2}, **extra
        )
        Trainer(cfg).fit()
        out[name] = root / name / "run"
    return out


def _greedy_by_hand(model, tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_greedy_is_the_argmax_path(runs: dict[str, Path], kind: str) -> None:
    loaded = load_trained(runs[kind])
    assert loaded.kind == ("adapter" if kind == "lora" else "full")
    options = GenerationOptions(max_new_tokens=12)
    [text] = generate_texts(loaded.model, loaded.tokenizer, [PROMPT], options=options)
    assert text == _greedy_by_hand(loaded.model, loaded.tokenizer, PROMPT, 12)


def test_sampling_is_seeded_and_beams_are_deterministic(runs: dict[str, Path]) -> None:
    loaded = load_trained(runs["full"])

    def gen(**kw) -> str:
        options = GenerationOptions(max_new_tokens=16, **kw)
        return generate_texts(loaded.model, loaded.tokenizer, [PROMPT], options=options)[0]

    state = torch.get_rng_state()
    a = gen(do_sample=True, temperature=1.5, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert a == gen(do_sample=True, temperature=1.5, seed=1)
    others = {gen(do_sample=True, temperature=1.5, seed=s) for s in range(2, 6)}
    assert others - {a}  # other seeds draw other text
    # top_p this small keeps only the likeliest token: sampling collapses to greedy.
    assert gen(do_sample=True, top_p=1e-6, seed=3) == gen()
    beams = gen(num_beams=3)
    assert beams == gen(num_beams=3)
    assert isinstance(beams, str)
    with pytest.raises(KilnError, match=r"^num_beams: beam search is deterministic"):
        gen(num_beams=2, do_sample=True)
    with pytest.raises(KilnError, match=r"^top_p: must be in"):
        gen(do_sample=True, top_p=0.0)


def test_cli_generate_full_checkpoint_adapter_and_t5(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["generate", str(runs["full"]), PROMPT, "--max-new-tokens", "12"]) == 0
    from_final = capsys.readouterr().out
    assert from_final.startswith(PROMPT)

    # A checkpoint holds no tokenizer: it comes from the run's final/ ...
    ckpt = runs["full"] / "checkpoints" / "step-6"
    assert main(["generate", str(ckpt), PROMPT, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == from_final
    # ... or, without final/, is trained again from the data (checked by its fingerprint).
    copy = tmp_path / "ckpt-only"
    shutil.copytree(runs["full"] / "checkpoints", copy / "checkpoints")
    assert main(["generate", str(copy), PROMPT, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == from_final

    assert main(["generate", str(runs["lora"] / "final"), PROMPT, "--num-beams", "2"]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)

    args = ["generate", str(runs["t5"]), "Lemon Rice 3", "--sample", "--top-p", "0.9"]
    assert main([*args, "--max-new-tokens", "10"]) == 0
    t5_text = capsys.readouterr().out
    assert main([*args, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == t5_text  # seed 0 by default
    assert main(["generate", str(runs["t5"]), "Lemon Rice 3", "--num-beams", "2"]) == 0


def test_cli_generate_errors_are_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(tmp_path / "nope"), PROMPT]) == 2
    assert capsys.readouterr().err.strip() == f"kiln: error: {tmp_path / 'nope'}: no such directory"
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), PROMPT]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["generate", str(runs["full"]), PROMPT, "--temperature", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln: error: --temperature: must be > 0, got 0.0"]
    assert main(["generate", str(runs["full"]), PROMPT, "--num-beams", "2", "--sample"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln: error: --num-beams: beam search is deterministic; drop --sample"]
