"""Divergence (train.anomaly): non-finite steps are skipped on the device, stop the run as
diverged, or roll it back; spikes are flagged; nothing non-finite is ever kept.

NaNs and spikes are injected by wrapping `kiln.engine.parts.forward_loss_sum`, which the
training step calls (the test-only hook: `poison`), multiplying the loss of chosen training
micro-batches (0-based, in the order they run) by NaN or by a factor.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import StopAt, make_rows, tiny_config, write_jsonl
from safetensors.torch import load_file

import kiln.engine.parts as parts_module
from kiln import Trainer
from kiln.callbacks import Callback
from kiln.checkpoint import CheckpointManager

NAN = float("nan")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("anomaly-data")
    return (
        write_jsonl(tmp / "train.jsonl", make_rows(96, seed=3)),
        write_jsonl(tmp / "val.jsonl", make_rows(16, seed=4)),
    )


class Tap(Callback):
    """Holds the run, so `poison` can key its plan on the global micro-step."""

    run: Any = None

    def on_train_begin(self, run: Any) -> None:
        self.run = run


def poison(monkeypatch: pytest.MonkeyPatch, plan: dict[int, float], tap: Tap | None = None) -> None:
    """Multiply the loss of training micro-batch i by plan[i]: i counts the micro-batches as
    they run in this process, or, with `tap`, is the run's micro-step (the same after a
    resume; and after a rollback, when the same step runs again)."""
    calls = [0]
    original = parts_module.forward_loss_sum

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        loss_sum, logits, labels = original(*args, **kwargs)
        key = calls[0] if tap is None else tap.run.state.micro_step
        calls[0] += 1
        factor = plan.get(key)
        return (loss_sum if factor is None else loss_sum * factor), logits, labels

    monkeypatch.setattr(parts_module, "forward_loss_sum", wrapped)


def _cfg(tmp: Path, files: tuple[Path, Path], name: str, **sections: Any) -> Any:
    train = {"max_steps": 12, "batch_size": 4, "grad_accum_steps": 2, **sections.pop("train", {})}
    return tiny_config(
        tmp / name,
        *files,
        train=train,
        eval={"every_steps": 4, "max_batches": 2},
        checkpoint={"every_steps": 4, "keep_last": 5, **sections.pop("checkpoint", {})},
        log={"every_steps": 1, "progress": "none", "plots": False},
        **sections,
    )


def _anomalies(run: Path) -> list[dict[str, Any]]:
    path = run / "anomalies.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _finite_checkpoints(run: Path) -> list[int]:
    steps = []
    for info in CheckpointManager(run / "checkpoints").list():
        weights = load_file(info.path / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), info.path
        optim = torch.load(info.path / "optimizer.pt", weights_only=True)
        for state in optim["state"].values():
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
        steps.append(info.step)
    return steps


def test_skip_equals_a_run_resumed_past_the_bad_batch(tmp_path, data, monkeypatch) -> None:
    poison(monkeypatch, {9: NAN})  # step 5's second micro-batch
    cfg = _cfg(tmp_path, data, "skip")
    result = Trainer.from_config(cfg).fit()
    assert result.status == "finished"
    [record] = _anomalies(cfg.run_dir)
    assert (record["step"], record["micro_step"], record["kind"]) == (5, 10, "nan_loss")
    assert (record["action"], record["value"]) == ("skip", "nan")
    assert len(record["samples"]) == 8  # the window: 2 micro-batches of 4
    assert record["sources"] is None  # packed blocks are not rows
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert train[5]["loss"] is None  # not NaN: metrics.jsonl stays valid JSON
    assert train[5]["skipped"] == 1
    assert all(math.isfinite(train[s]["loss"]) for s in train if s != 5)
    monkeypatch.undo()
    # The reference: step 4's checkpoint with the counters and the cursor moved past step 5's
    # window (8 samples, 2 micro-batches), as if step 5 had trained on nothing.
    source = cfg.run_dir / "checkpoints" / "step-4"
    state = json.loads((source / "trainer_state.json").read_text())
    counters = state["loop"]["state"]
    counters["step"], counters["cursor"] = 5, counters["cursor"] + 8
    counters["micro_step"] += 2
    moved = tmp_path / "moved" / "checkpoints"

    def copy(name: str) -> Any:
        if name == "trainer_state.json":
            return lambda p: p.write_text(json.dumps(state))
        return lambda p: shutil.copyfile(source / name, p)

    files = ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml"]
    point = CheckpointManager(moved).save(5, {name: copy(name) for name in files})
    ref_cfg = _cfg(tmp_path, data, "ref")
    Trainer(ref_cfg, resume=str(point)).fit()
    a = load_file(cfg.run_dir / "final" / "model.safetensors")
    b = load_file(ref_cfg.run_dir / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_stop_ends_the_run_diverged_with_nothing_poisoned(tmp_path, data, monkeypatch) -> None:
    poison(monkeypatch, {10: NAN})  # step 6
    cfg = _cfg(tmp_path, data, "stop", train={"anomaly": {"policy": "stop"}})
    result = Trainer.from_config(cfg).fit()
    assert result.status == "diverged"
    assert result.stop.reason == "diverged at step 6: a nan loss (train.anomaly.policy stop)"
    assert not (cfg.run_dir / "final").exists()
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("diverged", 4)
    assert _finite_checkpoints(cfg.run_dir) == [4]  # none at or after the anomaly
    assert math.isfinite(result.best_metric)


def test_consecutive_non_finite_steps_stop_even_when_skipping(tmp_path, data, monkeypatch) -> None:
    poison(monkeypatch, dict.fromkeys(range(6, 24), NAN))  # from step 4 on
    cfg = _cfg(tmp_path, data, "many", train={"anomaly": {"max_consecutive": 3}})
    result = Trainer.from_config(cfg).fit()
    assert result.status == "diverged"
    assert result.stop.reason == (
        "diverged at step 6: 3 non-finite steps in a row (steps 4-6), the last with a nan "
        "loss (train.anomaly.max_consecutive 3)"
    )
    assert [r["step"] for r in _anomalies(cfg.run_dir)] == [4, 5, 6]
    assert _finite_checkpoints(cfg.run_dir) == [4]  # step 4 was skipped: finite, kept
    assert not (cfg.run_dir / "final").exists()


def _rollback_run(tmp: Path, data: tuple[Path, Path], name: str, monkeypatch) -> Any:
    """12 steps of 2 micro-batches of 4 (96 samples: one epoch); checkpoints at 3, 6, 9, 12;
    a NaN at step 7. Returns the config, the result and every micro-batch's sample indices."""
    from kiln.engine.anomaly import AnomalyGuard

    drawn: list[list[int]] = []
    original = AnomalyGuard.drew

    def drew(self: Any, indices: torch.Tensor) -> None:
        drawn.append(indices.tolist())
        original(self, indices)

    monkeypatch.setattr(AnomalyGuard, "drew", drew)
    poison(monkeypatch, {12: NAN})  # step 7's first micro-batch
    rollback = {"anomaly": {"policy": "rollback"}}
    unpacked = {"packing": False}
    cfg = _cfg(tmp, data, name, train=rollback, checkpoint={"every_steps": 3}, data=unpacked)
    trainer = Trainer.from_config(cfg)
    result = trainer.fit()
    monkeypatch.undo()
    return cfg, result, drawn, len(trainer.setup().train_data)


def test_rollback_is_deterministic_and_leaves_the_samples_out(tmp_path, data, monkeypatch) -> None:
    cfg, result, drawn, n = _rollback_run(tmp_path, data, "a", monkeypatch)
    assert result.status == "finished"
    [record] = _anomalies(cfg.run_dir)
    assert (record["step"], record["action"], record["to_step"]) == (7, "rollback", 6)
    assert record["samples"] == drawn[12] + drawn[13]
    # One row per sample here (unpacked), so each sample's source row is known.
    assert record["sources"] == [f"{data[0]}:{s + 1}" for s in record["samples"]]
    # Steps 1-7 drew 14 micro-batches; back at step 6 (48 samples into the epoch), steps
    # 7-12 drew 12 more. The rest of epoch 0 less the 8 left out fills `steps` of them.
    assert len(drawn) == 26
    steps = (n - 48 - 8) // 8
    assert steps >= 3
    again = {s for batch in drawn[14 : 14 + 2 * steps] for s in batch}
    assert len(again) == 8 * steps
    assert not again & set(record["samples"])
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
    assert _finite_checkpoints(cfg.run_dir) == [3, 6, 9, 12]
    # Deterministic: a second run gives the same weights.
    cfg2, _, drawn2, _ = _rollback_run(tmp_path, data, "b", monkeypatch)
    assert drawn2 == drawn
    a = load_file(cfg.run_dir / "final" / "model.safetensors")
    b = load_file(cfg2.run_dir / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_resumed_run_with_anomalies_is_bit_exact(tmp_path, data, monkeypatch) -> None:
    spike = {"window": 4, "warmup_steps": 2, "sigma": 3.0}
    anomaly = {"anomaly": {"spike": spike}}
    runs = {}
    for name, stop in (("straight", None), ("cut", 7)):
        tap = Tap()
        poison(monkeypatch, {5: NAN, 11: 30.0}, tap)  # steps 3 (nan) and 6 (a spike)
        cfg = _cfg(tmp_path, data, name, train=anomaly)
        callbacks = [tap] if stop is None else [tap, StopAt(stop)]
        Trainer(cfg, callbacks=callbacks).fit()
        if stop is not None:
            tap = Tap()
            poison(monkeypatch, {5: NAN, 11: 30.0}, tap)
            Trainer(cfg, callbacks=[tap], resume=True).fit()
        runs[name] = cfg.run_dir
        monkeypatch.undo()
    a, b = (load_file(runs[n] / "final" / "model.safetensors") for n in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert _anomalies(runs["cut"]) == _anomalies(runs["straight"])
    assert [(r["step"], r["kind"]) for r in _anomalies(runs["cut"])] == [
        (3, "nan_loss"),
        (6, "spike"),
    ]
    keys = ("step", "split", "loss", "grad_norm", "grad_norm_z", "skipped", "val_loss")
    logged = [
        [tuple(json.loads(x).get(k) for k in keys) for x in (runs[n] / "metrics.jsonl").open()]
        for n in runs
    ]
    assert logged[0] == logged[1]
    assert any(row[4] is not None for row in logged[0])  # grad_norm_z, once there are norms


def test_a_spike_is_flagged_and_a_nan_in_its_window_is_ignored(tmp_path, data, monkeypatch) -> None:
    poison(monkeypatch, {9: NAN, 19: 20.0})  # steps 10 and 20 (one micro-batch a step)
    spike = {"window": 8, "warmup_steps": 4, "sigma": 6.0, "action": "skip"}
    train = {"max_steps": 24, "grad_accum_steps": 1, "anomaly": {"spike": spike}}
    cfg = _cfg(tmp_path, data, "spike", train=train)
    result = Trainer.from_config(cfg).fit()
    assert result.status == "finished"
    found = [(r["step"], r["kind"], r["action"]) for r in _anomalies(cfg.run_dir)]
    assert found == [(10, "nan_loss", "skip"), (20, "spike", "skip")]
    [spiked] = [r for r in _anomalies(cfg.run_dir) if r["kind"] == "spike"]
    assert spiked["z"] > 6.0
    assert spiked["value"] == pytest.approx(20 * result.loss_history[18], rel=0.2)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [10, 20]


def test_no_host_sync_between_logging_steps(tmp_path, data, monkeypatch) -> None:
    """Reading a tensor's value (item, bool, int, float, tolist) is a host sync on an
    accelerator: kiln's loop does it on logging steps only (every 4th here). Reads of the
    batch's host copy (input_tokens, packed_batch: are there document starts inside a block)
    and of the data order (the cursor) are not device reads. (transformers' own model code is
    not counted: when documents start inside a block its masking checks the position ids on
    the host, once per forward.) The guard runs the rule every device but
    the CPU runs: on the CPU, where a read costs nothing, it judges on the host."""
    import sys

    import kiln
    from kiln.engine.anomaly import AnomalyGuard

    built = AnomalyGuard.__init__

    def device_rule(self: AnomalyGuard, *args: Any, **kwargs: Any) -> None:
        built(self, *args, **kwargs)
        self._host = False

    monkeypatch.setattr(AnomalyGuard, "__init__", device_rule)

    reads: list[str] = []
    package = str(Path(kiln.__file__).parent)
    host = {"input_tokens", "packed_batch", "next_indices", "_next_eligible"}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _orig: Any = original, **k: Any) -> Any:
            code = sys._getframe(1).f_code
            if code.co_filename.startswith(package) and code.co_name not in host:
                reads.append(f"{Path(code.co_filename).name}:{code.co_name}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class PerStep(Callback):
        def __init__(self) -> None:
            self.by_step: dict[int, list[str]] = {}

        def on_step_begin(self, run: Any) -> None:  # the reads of the step before, and after it
            if run.state.step:
                self.by_step[run.state.step] = list(reads)
            reads.clear()

        def on_train_end(self, run: Any) -> None:
            self.by_step[run.state.step] = list(reads)

    spy = PerStep()
    train = {"max_steps": 8, "grad_accum_steps": 2}
    cfg = tiny_config(
        tmp_path,
        *data,
        train=train,
        log={"every_steps": 4, "progress": "none", "plots": False},
    )
    Trainer(cfg, callbacks=[spy]).fit()
    monkeypatch.undo()
    assert sorted(spy.by_step) == list(range(1, 9))
    assert sorted(s for s, r in spy.by_step.items() if r) == [4, 8], spy.by_step
    assert "trainer.py:_log_train" in spy.by_step[4]  # the counter sees the loop's own reads


@pytest.mark.slow
def test_quickstart_at_lr_1e6_exits_4_diverged(tmp_path: Path) -> None:
    from helpers import start_train

    from kiln.runs import read_status

    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    extra = ["optim.lr=1e6", "train.max_steps=50", f"output_dir={run}"]
    proc = start_train(config, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    verdict = [x for x in err.splitlines() if x.startswith("kiln: diverged at step ")]
    assert len(verdict) == 1
    assert "non-finite steps in a row" in verdict[0]
    status = read_status(run)
    assert (status["state"], status["exit_code"]) == ("diverged", 4)
    assert status["step"] <= 5 + 10  # max_consecutive 5, judged at the next logging step (10)
    assert not (run / "final").exists()
    _finite_checkpoints(run)
    assert _anomalies(run)


def test_the_cpu_host_judgement_equals_the_device_one() -> None:
    """On the CPU the guard judges on the host (issue 29: ~40 tiny tensor ops a step); the
    device rule, run here on CPU tensors, must reach the same verdicts and the same window
    (the checkpointed state) step for step: NaN and inf losses and norms, spikes, warm-up."""
    from kiln.config.train import AnomalyConfig
    from kiln.engine.anomaly import AnomalyGuard

    cfg = AnomalyConfig(spike={"window": 8, "warmup_steps": 4, "sigma": 3.0, "action": "skip"})
    host, device = AnomalyGuard(cfg, torch.device("cpu")), AnomalyGuard(cfg, torch.device("cpu"))
    device._host = False  # the rule every other device runs
    gen = torch.Generator().manual_seed(0)
    losses = (2.0 + 0.05 * torch.randn(40, generator=gen)).tolist()
    losses[6], losses[11], losses[17], losses[18], losses[25] = NAN, 50.0, math.inf, 9.0, 40.0
    norms = [1.0] * 40
    norms[21], norms[30] = NAN, math.inf
    verdicts: dict[str, list[tuple[float, ...]]] = {"host": [], "device": []}
    for i, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        at = {"step": i + 1, "epoch": 0, "micro_step": i}
        args = (torch.tensor(loss), torch.tensor(norm), [torch.tensor(loss)])
        skip_host = host.check(*args, **at)
        skip_device = device.check(*args, **at)
        assert isinstance(skip_host, bool)
        assert skip_host == bool(skip_device.item()), i
    rows = {
        "host": host._rows,
        "device": torch.stack(device._rows).tolist(),
    }
    for name, table in rows.items():
        verdicts[name] = [(r[0], r[1], r[3], r[4]) for r in table]  # loss, norm, spike, skip
    assert str(verdicts["host"]) == str(verdicts["device"])  # NaN == NaN as text
    spiked = [i for i, r in enumerate(verdicts["host"]) if r[2]]
    assert {11, 18, 25} <= set(spiked), spiked
    non_finite = [i for i, r in enumerate(verdicts["host"]) if r[3] and i not in spiked]
    assert non_finite == [6, 17, 21, 30]
    for h, d in zip(rows["host"], rows["device"], strict=True):
        if math.isfinite(h[2]) or math.isfinite(d[2]):
            assert h[2] == pytest.approx(d[2], rel=1e-5, abs=1e-5)  # z: float64 vs float32
    assert host.state_dict() == device.state_dict()


def test_a_host_skip_leaves_the_optimizer_as_the_device_flag_does() -> None:
    """`Precision.step(optimizer, True)` (judged on the host) leaves weights, moments and step
    counts exactly as fused AdamW's `found_inf` flag does; False steps as a plain step."""
    from kiln.device import Precision
    from kiln.optim import build_optimizer

    def trained(skips: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        precision = Precision("fp32", torch.device("cpu"))
        for i, skip in enumerate(skips):
            torch.manual_seed(i)
            model(torch.randn(3, 4)).square().sum().backward()
            precision.step(opt, skip)
            opt.zero_grad(set_to_none=True)
        return model.state_dict(), opt.state_dict()

    flags = [torch.tensor(float(s)) for s in (0, 1, 0, 1, 1, 0)]
    model_a, opt_a = trained(flags)
    model_b, opt_b = trained([bool(f.item()) for f in flags])
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for k, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][k][name]), (k, name)
