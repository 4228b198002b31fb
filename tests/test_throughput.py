"""ThroughputMeter: windowed loss, throughput, peak memory, MFU; in metrics.jsonl and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from kiln import Trainer
from kiln.metrics import ThroughputMeter
from kiln.metrics.throughput import peak_flops, peak_memory_mb

CPU = torch.device("cpu")


def test_rates_and_windowed_average_from_explicit_times() -> None:
    tracker = ThroughputMeter(CPU, flops_per_token=600.0, peak=1e6, window=3)
    tracker.start(tokens=100, samples=10, now=5.0)  # e.g. a resumed run's counters
    first = tracker.log([4.0, 2.0], tokens=1100, samples=20, now=7.0)
    assert first["tokens_per_s"] == 500.0
    assert first["samples_per_s"] == 5.0
    assert first["loss_avg"] == 3.0
    assert first["mfu"] == pytest.approx(500.0 * 600.0 / 1e6)
    second = tracker.log([6.0, 8.0], tokens=1300, samples=24, now=8.0)
    assert second["tokens_per_s"] == 200.0
    assert second["loss_avg"] == pytest.approx((2.0 + 6.0 + 8.0) / 3)  # the last 3 steps
    assert second["peak_mem_mb"] > 0
    summary = tracker.summary(tokens=1300, samples=24, now=9.0)
    assert summary["samples_per_s"] == pytest.approx(14 / 4)
    assert summary["mfu"] == pytest.approx(1200 / 4 * 600.0 / 1e6)
    no_peak = ThroughputMeter(CPU, flops_per_token=600.0)
    assert "mfu" not in no_peak.log([1.0], tokens=10, samples=1, now=1.0)
    with pytest.raises(ValueError, match="window"):
        ThroughputMeter(CPU, window=0)


def test_peak_flops_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_flops(CPU) is None  # unknown: no MFU on a CPU
    monkeypatch.setenv("KILN_PEAK_FLOPS", "312e12")
    assert peak_flops(CPU) == 312e12
    monkeypatch.setenv("KILN_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="KILN_PEAK_FLOPS"):
        peak_flops(CPU)
    before = peak_memory_mb(CPU)
    blob = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert peak_memory_mb(CPU) >= before
    assert peak_memory_mb(CPU) > 64
    del blob


def test_train_records_and_summary_carry_the_tracked_metrics(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_PEAK_FLOPS", "1e9")  # pretend the CPU's peak is known
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 6}, log={"every_steps": 3})
    result = Trainer(cfg).fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    for r in train:
        assert {
            "loss",
            "loss_avg",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "samples_per_s",
            "peak_mem_mb",
            "mfu",
        } <= r.keys()
        assert r["tokens_per_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["tokens_per_s"] / 32)  # 32-token blocks
    assert train[1]["loss_avg"] == pytest.approx(sum(result.loss_history) / 6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peak_memory_mb"] > 0
    assert summary["samples_per_s"] > 0
    assert summary["mfu"] > 0
