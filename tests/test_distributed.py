"""DDP on CPU with gloo under torchrun: the same training as one process with the same global
batch, one run directory written by the main rank, and resume at another world size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import free_port, gloo_env, make_rows, tiny_raw, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(tmp: Path, name: str, batch: int, **train: Any) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(160, seed=7))
        write_jsonl(tmp / "val.jsonl", make_rows(24, seed=8))
    raw = tiny_raw(tmp, data, tmp / "val.jsonl")
    raw["output_dir"] = str(tmp / name)
    raw["data"]["cache_dir"] = str(tmp / f"cache-{name}")
    raw["optim"] = {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"}
    raw["train"] = {"max_steps": 10, "batch_size": batch, "num_threads": 1, **train}
    raw["eval"] = {"every_steps": 5}
    raw["checkpoint"] = {"every_steps": 5, "keep_last": 3}
    raw["log"] = {"every_steps": 1, "progress": "plain", "plots": False}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "kiln", "train", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=gloo_env(), capture_output=True, text=True, timeout=timeout
    )


def _records(run: Path, split: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The reference: one process, batch 8 (in this process: torchrun at world size 1 runs
    the same code)."""
    from kiln.cli import main

    tmp = tmp_path_factory.mktemp("ddp")
    assert main(["-q", "train", str(_config(tmp, "one", 8))]) == 0
    return tmp, tmp / "one"


@pytest.fixture(scope="module")
def replicated(single) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """World 2 x batch 4 under DDP: the reference's global batch."""
    tmp, _ = single
    done = _torchrun(2, str(_config(tmp, "two", 4)))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "two", done


def test_ddp_two_ranks_equal_one_process_with_the_same_global_batch(single, replicated) -> None:
    _, one = single
    two, done = replicated
    # One run directory, written once: one train row per step, one val row per validation.
    assert [r["step"] for r in _records(two)] == list(range(1, 11))
    assert [r["step"] for r in _records(two, "val")] == [5, 10]
    _close([r["loss"] for r in _records(two)], [r["loss"] for r in _records(one)], 1e-5)
    _close(
        [r["val_loss"] for r in _records(two, "val")],
        [r["val_loss"] for r in _records(one, "val")],
        1e-5,
    )
    assert _records(two)[-1]["tokens"] == _records(one)[-1]["tokens"]  # counted over all ranks
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 10
    assert json.loads((two / "status.json").read_text())["state"] == "finished"
    a = load_file(two / "final" / "model.safetensors")
    b = load_file(one / "final" / "model.safetensors")
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-10", "step-5"]
    # Progress and the story of the run came from the main rank only.
    out = done.stdout + done.stderr
    assert out.count("step 10/10  loss") == 1
    # (Whichever rank gets there first trains the tokenizer; the other reads it from the cache.)
    told = out.count("trained a byte-level BPE tokenizer") + out.count("tokenizer from cache")
    assert told == 1


def test_pause_at_two_ranks_and_resume_at_one_continues_the_run(
    single, replicated, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli import main

    tmp, one = single
    two, _ = replicated
    # The same global batch on one rank: 8 x 1 (the checkpoint recorded 4 x 2).
    whole = _resume(tmp, two, "two-to-one", 1, "train.batch_size=8")
    assert [r["step"] for r in _records(whole)] == list(range(1, 11))
    _close([r["loss"] for r in _records(whole)], [r["loss"] for r in _records(one)], 1e-4)
    # Another global batch is refused: the data order is defined over it. Exit 2, also
    # through the launcher (torchrun itself says 1 for any failed rank).
    config = _config(tmp, "refused", 4)
    args = ["-q", "train", str(config), "--resume", str(two / "checkpoints" / "step-5")]
    assert main([*args, "train.batch_size=4", "--nproc", "1"]) == 2
    assert main([*args, "train.batch_size=4"]) == 2  # in this process: the line itself
    line = "global batch (train.batch_size x ranks): 4 x 2 = 8 -> 4 x 1 = 4"
    assert line in capsys.readouterr().err
    # Refused before config.yaml: the corrected command is not blocked by the refused one.
    left = sorted(p.name for p in (tmp / "refused").iterdir() if p.name != ".kiln.lock")
    assert left == ["status.json"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_every_rank_with_one_checkpoint_and_exit_3(
    tmp_path: Path, signame: str
) -> None:
    """SIGTERM pauses; SIGUSR1 (a sweep pruning the trial) stops without a final model. The
    launcher passes either on to both ranks, which agree on the step to stop at."""
    import signal
    import time

    from kiln.runs import read_status

    config = _config(tmp_path, "paused", 4, max_steps=100_000)
    run = tmp_path / "paused"
    cmd = [sys.executable, "-m", "kiln", "-q", "train", str(config), "--nproc", "2"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=gloo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never got going"
            status = read_status(run)
            if status is not None and status["state"] == "running" and status["step"] >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    status = read_status(run)
    assert status is not None
    want = ("paused", "signal") if signame == "SIGTERM" else ("stopped", "pruned")
    assert (status["state"], status["stop"]["kind"]) == want
    step = status["step"]
    assert (run / "checkpoints" / f"step-{step}").is_dir()
    assert not (run / "final").exists()
    assert [r["step"] for r in _records(run)] == list(range(1, step + 1))  # written once
    if signame == "SIGUSR1":
        return
    # Both ranks agree again on resume, and the run finishes: exit 0 through the launcher.
    from kiln.cli import main

    resume = ["--resume", str(run), "--nproc", "2", f"train.max_steps={step + 2}"]
    assert main(["-q", "train", *resume]) == 0
    assert [r["step"] for r in _records(run)] == list(range(1, step + 3))


def _instruction_config(tmp: Path, name: str, batch: int, accum: int) -> Path:
    """Instruction data padded per batch: each rank's micro-batches hold other target counts."""
    path = _config(tmp, name, batch, max_steps=3, grad_accum_steps=accum)
    raw = yaml.safe_load(path.read_text())
    raw["task"] = "instruction"
    raw["data"].update(
        {
            "prompt_template": "Recipe for {title}:\n",
            "response_template": "{text}",
            "max_length": 64,
        }
    )
    raw["model"]["max_position_embeddings"] = 64
    path.write_text(yaml.safe_dump(raw))
    return path


def test_uneven_target_tokens_per_rank_give_the_single_process_gradients(tmp_path: Path) -> None:
    one = _torchrun(1, str(_instruction_config(tmp_path, "one", batch=8, accum=1)))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, str(_instruction_config(tmp_path, "two", batch=2, accum=2)))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _records(tmp_path / "two"), _records(tmp_path / "one")
    # grad_norm is the norm of the full gradient before clipping: equal gradients, every step.
    _close([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], 1e-5)
    _close([r["loss"] for r in a], [r["loss"] for r in b], 1e-5)


def test_two_nodes_on_loopback_equal_one_node(single) -> None:
    tmp, one = single
    config = _config(tmp, "nodes", 4)
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "kiln", "-q", "train", str(config), "--nproc", "1"]
    cmd += ["--nnodes", "2", "--rdzv-endpoint", endpoint]
    nodes = [
        subprocess.Popen(
            [*cmd, "--node-rank", str(k)],
            cwd=ROOT,
            env=gloo_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    nodes_run = tmp / "nodes"
    assert [r["step"] for r in _records(nodes_run)] == list(range(1, 11))
    _close([r["loss"] for r in _records(nodes_run)], [r["loss"] for r in _records(one)], 1e-5)


# ---- FSDP2 ---------------------------------------------------------------------------------------

FSDP = "train.distributed.strategy=fsdp"


@pytest.fixture(scope="module")
def sharded(single) -> Path:
    """World 2 x batch 4 under FSDP2: the reference's global batch. Validation in 5 batches
    (the ranks run 3 forwards each, one spare), generation eval and the end sample (every
    rank runs each forward of the sharded model)."""
    tmp, _ = single
    config = _config(tmp, "fsdp", 4, distributed={"strategy": "fsdp"})
    raw = yaml.safe_load(config.read_text())
    generate = {"num_samples": 3, "batch_size": 2, "max_new_tokens": 8, "metrics": ["bleu"]}
    raw["eval"].update(batch_size=5, generate=generate, sample_prompt="Recipe")
    raw["eval"]["sample_max_new_tokens"] = 8
    config.write_text(yaml.safe_dump(raw))
    done = _torchrun(2, str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "fsdp"


def test_fsdp_two_ranks_equal_one_process_and_checkpoint_dcp_shards(single, sharded) -> None:
    from kiln.checkpoint import CheckpointManager

    _, one = single
    assert [r["step"] for r in _records(sharded)] == list(range(1, 11))
    _close([r["loss"] for r in _records(sharded)], [r["loss"] for r in _records(one)], 1e-5)
    _close(
        [r["val_loss"] for r in _records(sharded, "val")],
        [r["val_loss"] for r in _records(one, "val")],
        1e-5,
    )
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["sample"].startswith("Recipe")
    assert len(summary["sample"]) > len("Recipe")
    assert [r["val_gen_samples"] for r in _records(sharded, "val")] == [3, 3]
    assert len((sharded / "samples" / "step-10.jsonl").read_text().splitlines()) == 3
    # final/ is a plain save_pretrained directory with the full weights (tied ones once).
    a = load_file(sharded / "final" / "model.safetensors")
    b = load_file(one / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    # Checkpoints hold every rank's shard, listed and checksummed by the manifest.
    step = CheckpointManager(sharded / "checkpoints").verify(sharded / "checkpoints" / "step-10")
    files = json.loads((step.path / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files)
    assert "model.safetensors" not in files
    # `kiln eval` / `kiln generate` load such a checkpoint in one process: the shards, whole.
    from kiln.models.load import load_trained

    loaded = dict(load_trained(step.path).model.state_dict())
    assert all(torch.equal(loaded[name], a[name]) for name in a)


def _resume(tmp: Path, source: Path, name: str, nproc: int, *overrides: str) -> Path:
    """A new run directory started from `source`'s step-5 checkpoint, continued to step 10."""
    config = _config(tmp, name, 4)
    args = ["--resume", str(source / "checkpoints" / "step-5"), *overrides]
    done = _torchrun(nproc, str(config), *args, "train.max_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / name


def test_fsdp_shards_resume_bit_exactly_at_two_ranks_and_reshard_to_one(single, sharded) -> None:
    tmp, one = single
    again = _resume(tmp, sharded, "fsdp-again", 2, FSDP)
    # The same world size: bit-exact, losses and weights.
    assert [r["loss"] for r in _records(again)] == [r["loss"] for r in _records(sharded)]
    a = load_file(again / "final" / "model.safetensors")
    b = load_file(sharded / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in b)
    # World 1 x batch 8 reads the shards whole: the run continues as the single process does.
    whole = _resume(tmp, sharded, "fsdp-to-one", 1, "train.batch_size=8")
    assert [r["step"] for r in _records(whole)] == list(range(1, 11))
    _close([r["loss"] for r in _records(whole)], [r["loss"] for r in _records(one)], 1e-4)


def test_a_single_process_checkpoint_resumes_sharded_at_two_ranks(single) -> None:
    tmp, one = single
    split = _resume(tmp, one, "one-to-fsdp", 2, FSDP, "train.batch_size=4")
    assert [r["step"] for r in _records(split)] == list(range(1, 11))
    _close([r["loss"] for r in _records(split)], [r["loss"] for r in _records(one)], 1e-4)


def test_lora_under_fsdp_saves_every_ranks_adapter_shard(tmp_path: Path) -> None:
    lora = {"enabled": True, "r": 4, "target_modules": ["c_attn", "c_fc"]}
    runs = {}
    for strategy in ("ddp", "fsdp"):
        config = _config(tmp_path, strategy, 4, max_steps=4, distributed={"strategy": strategy})
        raw = yaml.safe_load(config.read_text())
        raw["lora"], raw["eval"], raw["checkpoint"] = lora, {"every_steps": 4}, {"every_steps": 2}
        raw["train"]["grad_noise"] = {"eta": 0.01}  # drawn whole, sliced per shard under FSDP
        config.write_text(yaml.safe_dump(raw))
        done = _torchrun(2, str(config))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[strategy] = tmp_path / strategy
    a = load_file(runs["fsdp"] / "final" / "adapter_model.safetensors")
    b = load_file(runs["ddp"] / "final" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert len(b) == 8  # lora_A and lora_B of 2 modules x 2 layers
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
        assert not torch.equal(b[name], torch.zeros_like(b[name]))  # trained, not the init
    base = [json.loads((runs[s] / "final" / "kiln_base.json").read_text()) for s in runs]
    assert base[0]["fingerprint"] == pytest.approx(base[1]["fingerprint"], rel=1e-12)


# ---- divergence under DDP ------------------------------------------------------------------------

NAN_ON_RANK_1 = """
import os, sys
import torch
import kiln.engine.parts as trainer  # the training step's forward_loss_sum
from kiln.callbacks import Callback
from kiln.config import load_config
from kiln.job import train

rank, out, at = int(os.environ["RANK"]), sys.argv[2], int(sys.argv[3])
forward, calls = trainer.forward_loss_sum, [0]

def poisoned(*args, **kwargs):  # rank 1's micro-batch `at` gives a NaN loss
    loss, logits, labels = forward(*args, **kwargs)
    calls[0] += 1
    return (loss * float("nan") if rank == 1 and calls[0] == at + 1 else loss), logits, labels

trainer.forward_loss_sum = poisoned

class Keep(Callback):
    def on_train_end(self, run):
        state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        torch.save(state, f"{out}/rank{rank}.pt")

train(load_config(sys.argv[1]), callbacks=[Keep()]).run_dir
"""


def test_a_nan_on_one_rank_makes_every_rank_skip_the_step(tmp_path: Path) -> None:
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    config = _config(tmp_path, "nan", 4, max_steps=6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += [str(script), str(config), str(tmp_path), "3"]  # step 4 (one micro-batch a step)
    done = subprocess.run(
        cmd, cwd=ROOT, env=gloo_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "nan"
    anomalies = [json.loads(x) for x in (run / "anomalies.jsonl").read_text().splitlines()]
    assert [(a["step"], a["kind"], a["action"]) for a in anomalies] == [(4, "nan_loss", "skip")]
    assert len(anomalies[0]["samples"]) == 8  # both ranks' samples
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the ranks stayed in step
    assert all(torch.isfinite(v).all() for v in a.values())
    assert [r["skipped"] for r in _records(run) if r.get("skipped")] == [1]
