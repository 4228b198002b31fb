"""What the loop counts and reports (issue 26, items 22-24): validation bounded in global
batches at any world size, loss_avg across resumes and rollbacks, the train losses of an
early-stopped run, and the tokens/s of a resumed one."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import StopAt, free_port, tiny_config

import kiln.engine.parts as parts_module
from kiln import Trainer

# ---- item 22: eval.max_batches counts global batches -----------------------------------------


def _eval_model_and_data() -> tuple[Any, Any]:
    """A seeded 2-layer GPT-2 and 11 sequences of uneven lengths (padding differs per batch)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.data import TokenDataset

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    g = torch.Generator().manual_seed(1)
    lengths = [30, 3, 17, 2, 9, 25, 6, 12, 4, 20, 8]
    seqs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]
    return GPT2LMHeadModel(cfg).eval(), TokenDataset(seqs)


BOUNDS = (2, 3, None)  # 8 of 11 samples, all 11 (the bound past the end), all 11


def _evaluate_all(batch_size: int, rank: Any = None) -> list[dict[str, float] | None]:
    from kiln.device import Precision
    from kiln.engine.evaluate import evaluate

    model, data = _eval_model_and_data()
    cpu = Precision("fp32", torch.device("cpu"))
    return [
        evaluate(
            model,
            data,
            task="causal_lm",
            batch_size=batch_size,
            pad_id=0,
            precision=cpu,
            max_batches=bound,
            rank=rank,
        )
        for bound in BOUNDS
    ]


def _eval_rank(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: the same global eval batch (2 x 2) as one process's 4."""
    import torch.distributed as dist

    from kiln.rank import RankContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = _evaluate_all(2, RankContext(rank, 2, rank))
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_item22_eval_max_batches_counts_global_batches_at_any_world_size(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    one = _evaluate_all(4)
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned ranks inherit it
    try:
        ctx = mp.start_processes(
            _eval_rank,
            args=(free_port(), str(tmp_path)),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 300  # the ranks are bounded, as every multi-process test
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                pytest.fail("the two evaluating ranks did not finish within 300 s")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank returns the all-reduced figures
    # The same samples at world size 1 and 2: the same tokens, and val_loss to float rounding
    # (the per-batch float32 sums differ with the batch size).
    tokens = [r["val_tokens"] for r in one]
    assert tokens[0] < tokens[1] == tokens[2]  # max_batches=2 bounds it: 8 of the 11 samples
    for single, two in zip(one, ranks[0], strict=True):
        assert two["val_tokens"] == single["val_tokens"]
        assert two["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6, abs=0)
        assert two["val_accuracy"] == pytest.approx(single["val_accuracy"], abs=1e-9)


def test_item22_a_resume_that_changes_the_validated_subset_says_so(
    tmp_path: Path, recipe_files
) -> None:
    from kiln.engine.resume import check_compatible

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 3},
        checkpoint={"every_steps": 3},
        eval={"max_batches": 2, "batch_size": 4},
    )
    result = Trainer(cfg).fit()
    path = result.checkpoint_paths[-1]
    # The same global train batch at 2 ranks (2 x 2), but eval.batch_size 4 stays per rank.
    two = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 3, "batch_size": 2},
        eval={"max_batches": 2, "batch_size": 4},
    )
    lines = check_compatible(two, path, world_size=2)
    assert "validation bounded to 16 samples (was 8)" in " ".join(lines)
    # eval.batch_size unset: the global eval batch is the global train batch, which holds.
    same = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 3, "batch_size": 2},
        eval={"max_batches": 2, "batch_size": None},
    )
    assert not [x for x in check_compatible(same, path, world_size=2) if "bounded" in x]


# ---- item 23: loss_avg across a resume and a rollback -----------------------------------------


def _train_rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _expected_loss_avg(history: list[float], step: int, window: int = 100) -> float:
    """The mean of the last `window` finite step losses up to `step`, summed in order."""
    tail = [x for x in history[:step] if math.isfinite(x)][-window:]
    return sum(tail) / len(tail)


def test_item23_loss_avg_goes_on_across_a_resume_bit_exactly(tmp_path: Path, recipe_files) -> None:
    def cfg(root: Path) -> Any:
        return tiny_config(
            root,
            *recipe_files,
            train={"max_steps": 8},
            log={"every_steps": 2},
            checkpoint={"every_steps": 3},
        )

    ref = Trainer(cfg(tmp_path / "ref")).fit()
    Trainer(cfg(tmp_path / "cut"), callbacks=[StopAt(5)]).fit()  # paused between log steps
    resumed = Trainer(cfg(tmp_path / "cut"), resume=True).fit()
    a, b = _train_rows(ref.run_dir), _train_rows(resumed.run_dir)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [2, 4, 6, 8]
    assert [r["loss_avg"] for r in b] == [r["loss_avg"] for r in a]  # bit-exact on CPU
    assert b[-1]["loss_avg"] == _expected_loss_avg(resumed.loss_history, 8)


def test_item23_a_rollback_does_not_count_the_undone_steps_twice(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    original = parts_module.forward_loss_sum

    def poisoned(*args: Any, **kwargs: Any) -> Any:  # step 6's loss is NaN, once
        loss_sum, logits, labels = original(*args, **kwargs)
        calls[0] += 1
        return (loss_sum * float("nan") if calls[0] == 6 else loss_sum), logits, labels

    monkeypatch.setattr(parts_module, "forward_loss_sum", poisoned)
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 8, "anomaly": {"policy": "rollback"}},
        log={"every_steps": 1},
        checkpoint={"every_steps": 4, "keep_last": 3},
    )
    result = Trainer(cfg).fit()
    anomalies = [json.loads(x) for x in (cfg.run_dir / "anomalies.jsonl").read_text().splitlines()]
    assert [(r["step"], r["to_step"]) for r in anomalies] == [(6, 4)]  # step 5 logged, undone
    rows = _train_rows(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert len(result.loss_history) == 8
    for row in rows:  # the window holds each step once: the ones run after the rollback
        assert row["loss_avg"] == _expected_loss_avg(result.loss_history, row["step"])


def test_item23_the_window_restarts_from_the_loss_history() -> None:
    from kiln.metrics import ThroughputMeter

    tracker = ThroughputMeter(torch.device("cpu"), window=3)
    tracker.log([9.0, 9.0, 9.0], tokens=1, samples=1, now=1.0)
    tracker.seed_window([1.0, 2.0, float("nan"), 4.0, 6.0])  # the last 3 finite ones
    assert tracker.log([8.0], tokens=2, samples=2, now=2.0)["loss_avg"] == (4.0 + 6.0 + 8.0) / 3
    tracker.seed_window([])
    assert tracker.log([5.0], tokens=3, samples=3, now=3.0)["loss_avg"] == 5.0


# ---- item 24: an early stop's last train losses; a resumed run's tokens/s ----------------------


def test_item24_an_early_stopped_run_logs_its_last_steps(tmp_path: Path, recipe_files) -> None:
    # min_delta 100: only the first validation (step 3) is an improvement; patience 1 stops the
    # run at the second (step 6), past the last log step (4).
    stopping = {"enabled": True, "patience": 1, "min_delta": 100.0}
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 20},
        log={"every_steps": 4},
        checkpoint={"every_steps": 3},
        eval={"every_steps": 3, "max_batches": 1, "early_stopping": stopping},
    )
    result = Trainer.from_config(cfg).fit()
    assert result.summary["steps"] == 6
    assert result.stop is not None
    assert result.stop.kind == "early_stop"
    assert len(result.loss_history) == 6  # every step's loss
    rows = _train_rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [4, 6]
    assert rows[-1]["loss"] == pytest.approx(sum(result.loss_history[4:]) / 2, rel=1e-12)
    assert result.summary["final_train_loss"] == rows[-1]["loss"]
    # The stop step's checkpoint (every 3 steps) is written after the row: nothing pending.
    state = json.loads((result.checkpoint_paths[-1] / "trainer_state.json").read_text())
    assert state["loop"]["state"]["step"] == 6
    assert (len(state["loop"]["loss_history"]), state["loop"]["pending_losses"]) == (6, [])


def test_item24_a_resumed_runs_tokens_per_s_is_its_own(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 8},
        log={"every_steps": 2},
        checkpoint={"every_steps": 4},
    )
    first = Trainer(cfg, callbacks=[StopAt(4)]).fit()
    before = first.summary["tokens"]
    resumed = Trainer(cfg, resume=True).fit()
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["tokens"] == 2 * before  # the run's total: both parts
    own = (summary["tokens"] - before) / summary["wall_time_s"]  # this process's part only
    assert summary["tokens_per_s"] == pytest.approx(own, rel=1e-12)
    assert summary["samples_per_s"] == pytest.approx(
        (summary["samples"] - first.summary["samples"]) / summary["wall_time_s"], rel=1e-12
    )
    assert resumed.throughput["tokens_per_s"] == summary["tokens_per_s"]
