"""Shared test helpers (import from here, not from conftest): tiny recipe-like data and
configs built in-process, offline, and the exact-resume assertion."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kiln import Callback, StopRequest, Trainer
from kiln.config import RunConfig, load_config

_DISHES = ["Rice", "Soup", "Stew", "Salad", "Curry", "Pasta", "Omelette", "Tacos"]
_MAINS = ["Lemon", "Garlic", "Tomato", "Chickpea", "Mushroom", "Ginger", "Basil", "Spinach"]
_VERBS = ["Chop", "Stir", "Simmer", "Bake", "Whisk", "Season", "Serve", "Rinse"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Small recipe rows with the bundled dataset's fields."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        title = f"{rng.choice(_MAINS)} {rng.choice(_DISHES)} {i}"
        ingredients = [f"{rng.randint(1, 4)} cups {rng.choice(_MAINS).lower()}" for _ in range(3)]
        steps = [f"{rng.choice(_VERBS)} the {rng.choice(_MAINS).lower()}." for _ in range(3)]
        text = (
            f"Title: {title}\n\nIngredients:\n"
            + "\n".join(f"- {x}" for x in ingredients)
            + "\n\nSteps:\n"
            + "\n".join(f"{j + 1}. {s}" for j, s in enumerate(steps))
        )
        rows.append(
            {
                "title": title,
                "ingredients": ingredients,
                "steps": steps,
                "text": text,
                "quality_score": round(rng.random(), 3),
                "difficulty": 1 + (i * 7) % 5,  # no RNG draw: the other fields stay as they were
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_raw(
    tmp_path: Path, train_file: Path, val_file: Path | None, /, **sections: Any
) -> dict[str, Any]:
    """The raw dict of `tiny_config` (to write as YAML for the CLI); `sections` merge in."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {
            "arch": "gpt2",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_position_embeddings": 64,
        },
        "tokenizer": {"vocab_size": 300},
        "data": {"train": str(train_file), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 20, "batch_size": 4},
        "log": {"every_steps": 5, "progress": "none", "plots": False},  # plots: test_plots
    }
    if val_file is not None:
        raw["data"]["val"] = str(val_file)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def tiny_config(
    tmp_path: Path, train_file: Path, val_file: Path | None, /, **sections: Any
) -> RunConfig:
    """A 2-layer GPT-2 config over the given files, writing into tmp_path/run."""
    return load_config(data=tiny_raw(tmp_path, train_file, val_file, **sections))


def bpe_tokenizer(corpus: list[str], vocab_size: int = 320) -> Any:
    """A tiny byte-level BPE trained in-process with the `tokenizers` library alone (no kiln)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def train_corpus(root: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """(root/train.jsonl holding `rows`, root/tok: a `bpe_tokenizer` of the text of
    `make_rows(200)`, saved): a training file and a tokenizer a test module shares."""
    tok = root / "tok"
    bpe_tokenizer([r["text"] for r in make_rows(200)]).save_pretrained(tok)
    return write_jsonl(root / "train.jsonl", rows), tok


class StopAt(Callback):
    """Checkpoint and stop at a given step, as a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            trainer.control.request_stop(StopRequest("requested", "test", resumable=True))


def logged_metrics(run: Path) -> list[tuple]:
    """(step, split, loss) of every metrics.jsonl record."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records]


def assert_resume_is_exact(
    make_cfg: Callable[[Path], RunConfig],
    tmp_path: Path,
    stop_at: int,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Trainer]:
    """Train once straight through and once stopped at `stop_at` and resumed: same everything.

    `make_cfg(root)` builds the run config writing under `root`. Compares the loss history,
    the validation metrics, metrics.jsonl and every weight. Returns (reference, resumed).
    """

    def run(root: Path, **kwargs: Any) -> tuple[Trainer, Any]:
        trainer = Trainer(make_cfg(root), **trainer_kwargs, **kwargs)
        return trainer, trainer.fit()

    ref_trainer, ref = run(tmp_path / "ref")
    first, _ = run(tmp_path / "cut", callbacks=[StopAt(stop_at)])
    assert first.state.step == stop_at
    resumed_trainer, resumed = run(tmp_path / "cut", resume=True)
    assert resumed_trainer.resumed_from is not None
    assert resumed.loss_history == ref.loss_history
    assert resumed.metrics == ref.metrics
    for name, tensor in ref_trainer.model.state_dict().items():
        assert torch.equal(tensor, resumed_trainer.model.state_dict()[name]), name
    assert logged_metrics(resumed.run_dir) == logged_metrics(ref.run_dir)
    return ref_trainer, resumed_trainer


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), by relative path: a user's
    files before and after a refused command must compare equal. The run lock file (whose
    content is the pid of the last process that took the lock) is not the user's."""
    import hashlib

    root = Path(root)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".kiln.lock")
    )
    return {
        str(p.relative_to(root)) if p != root else p.name: hashlib.sha256(
            p.read_bytes()
        ).hexdigest()
        for p in files
    }


ROOT = Path(__file__).resolve().parents[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, breadth first (by each process's parent in /proc/PID/stat)."""
    import contextlib

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree = [pid]
    for parent in tree:  # grows while it is read
        tree += [child for child, of in parents.items() if of == parent]
    return tree


def load_script(path: Path, name: str) -> Any:
    """The Python file `path` (a benchmark script) imported as module `name`."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_env() -> dict[str, str]:
    """The environment of a multi-process test: gloo on loopback, one thread per rank."""
    import os

    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def start_train(config: Path, *extra: str, **popen: Any) -> Any:
    """`kiln -q train CONFIG ...` in a subprocess (a `subprocess.Popen` with text pipes, one
    torch thread); `popen` goes to Popen."""
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "-q", "train", str(config), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **popen,
    )


def saved_gpt2(root: Path, tokenizer: Any, positions: int = 128) -> tuple[Path, Path]:
    """A tiny GPT-2 (2 x 32, no dropout, seeded) sized for `tokenizer`, and the tokenizer,
    saved under root/model and root/tok: a pretrained base that kiln and a reference trainer
    (TRL, HF) load alike."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "tok")
    return root / "model", root / "tok"


def reference_args(out: Path, *, batch: int, steps: int, lr: float) -> dict[str, Any]:
    """`TrainingArguments` (TRL's configs extend them) for a parity run against kiln: fp32 on
    the CPU, constant LR, no decay, clip 1.0, AdamW's defaults spelled out, a log row per step,
    nothing saved or reported."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
