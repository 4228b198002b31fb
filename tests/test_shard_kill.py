"""Training from token shards killed for real (issue 28): SIGKILL at random moments of a run on
shards, one process and two ranks, then resumed: bit-exact, as the in-memory kill tests; the
killed runs build their batches in a DataLoader worker (data.loader_workers), the reference in
the training process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, bpe_tokenizer, gloo_env, make_rows, tiny_raw, write_jsonl
from safetensors.torch import load_file

from kiln.data.shards import MANIFEST

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shard-kill")
    tok = root / "tok"
    bpe_tokenizer([r["text"] for r in make_rows(200)]).save_pretrained(tok)
    return write_jsonl(root / "train.jsonl", make_rows(400, seed=5)), tok


def _config(
    tmp: Path, corpus: tuple[Path, Path], name: str, *, cache: str, ranks: int, workers: int = 0
) -> Path:
    train, tok = corpus
    raw = tiny_raw(
        tmp,
        train,
        None,
        tokenizer={"name_or_path": str(tok)},
        data={
            "storage": "shards",
            "shard_tokens": 2000,  # many shards: blocks gathered across shard files
            "val_split": 0.1,
            "cache_dir": str(tmp / cache),
            "loader_workers": workers,  # batches built ahead: the same batches
        },
    )
    raw["output_dir"] = str(tmp / name)
    raw["train"] = {
        "max_steps": 40,
        "batch_size": 8 // ranks,  # the same global batch
        "grad_accum_steps": 2,
        "num_threads": 1,
    }
    raw["eval"] = {"every_steps": 20, "max_batches": 2}
    raw["checkpoint"] = {"every_steps": 1, "keep_last": 2, "resume": "auto"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path, ranks: int) -> subprocess.Popen[str]:
    extra = ("--nproc", str(ranks)) if ranks > 1 else ()
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "-q", "train", str(config), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=gloo_env(),  # gloo on loopback, one thread per rank
        start_new_session=True,  # a kill takes the launcher and every rank at once
    )


def _finish(config: Path, ranks: int) -> None:
    proc = _train(config, ranks)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]


def _losses(run: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records]


def _checksums(run: Path) -> list[str]:
    """The sha256 of every file of the shard set the run trained from."""
    directory = Path(json.loads((run / "data_stats.json").read_text())["shards"])
    manifest = json.loads((directory / MANIFEST).read_text())
    return [f["sha256"] for s in manifest["shards"] for f in s["files"].values()]


def _kill_at_random(config: Path, run: Path, ranks: int, seed: int, times: int) -> int:
    """Start the run and SIGKILL its whole process group at random moments, `times` times
    (the first kill after its first checkpoint); returns how many kills landed."""
    rng = random.Random(seed)
    kills = 0
    for _ in range(times):
        proc = _train(config, ranks)
        if kills == 0:
            deadline = time.monotonic() + 240
            while not any((run / "checkpoints").glob("step-*")):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 2.5))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    return kills


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "two-ranks"])
def test_sigkill_on_shards_then_resume_is_exact(
    tmp_path: Path, corpus: tuple[Path, Path], ranks: int
) -> None:
    ref = _config(tmp_path, corpus, "ref", cache="cache-ref", ranks=ranks)
    _finish(ref, ranks)
    # The killed run builds its batches ahead in a DataLoader worker a rank: the same training.
    config = _config(tmp_path, corpus, "kill", cache="cache-kill", ranks=ranks, workers=1)
    run = tmp_path / "kill"
    kills = _kill_at_random(config, run, ranks, seed=1234 + ranks, times=3 if ranks == 1 else 2)
    assert kills >= 2
    _finish(config, ranks)
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in b)
    assert _losses(run) == _losses(tmp_path / "ref")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == []
    # The set the killed run prepared for itself is the reference's, byte for byte.
    assert str(tmp_path / "cache-kill") in (run / "data_stats.json").read_text()
    assert _checksums(run) == _checksums(tmp_path / "ref")
