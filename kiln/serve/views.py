"""What the API reads from a job's run directory: current metrics, history (downsampled so
spikes survive), throughput and ETA, and checkpoints (with their manifest checksums), all
through the run directory's owner, `kiln.runs`."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runs import MANIFEST, RunPaths, list_checkpoints, read_metrics, read_status
from kiln.serve.store import JobRow

__all__ = [
    "CheckpointInfo",
    "checkpoint_dir",
    "complete_checkpoints",
    "current",
    "describe",
    "downsample",
    "history",
    "tar_stream",
    "throughput",
]


def describe(job: JobRow) -> dict[str, Any]:
    """A job for the API: the row, and what its status.json says now."""
    status = read_status(job.run_dir) or {}
    out = job.to_dict()
    out.update({k: status.get(k) for k in ("step", "total_steps", "epoch", "eta_s", "heartbeat")})
    out["world_size"] = status.get("world_size")  # ranks now; its changes (elastic runs):
    out["world_size_changes"] = status.get("world_size_changes") or []  # {step, from, to, reason}
    out["stop_requested"] = job.stop_requested is not None
    return out


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (split, step), the last written (a resumed run logs steps again)."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        seen[(str(r.get("split")), int(r["step"]))] = r
    return sorted(seen.values(), key=lambda r: r["step"])


def downsample(records: list[dict[str, Any]], max_points: int, key: str = "loss") -> list[dict]:
    """At most `max_points` records: the steps cut into max_points // 2 buckets, each kept as
    its records with the smallest and the largest `key` (in step order), so a spike survives
    however far the history is zoomed out."""
    if len(records) <= max_points:
        return records
    buckets = max(1, max_points // 2)
    size = math.ceil(len(records) / buckets)
    out = []
    for first in range(0, len(records), size):
        bucket = records[first : first + size]
        valued = [r for r in bucket if _finite(r.get(key))]  # (NaN would win every min)
        if not valued:
            out.append(bucket[-1])
            continue
        low = min(valued, key=lambda r: r[key])
        high = max(valued, key=lambda r: r[key])
        out += sorted({id(r): r for r in (low, high)}.values(), key=lambda r: r["step"])
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def history(
    run_dir: str | Path,
    since_step: int | None = None,
    until_step: int | None = None,
    max_points: int = 1000,
) -> dict[str, list[dict[str, Any]]]:
    """Train and val records between the steps (inclusive), each split at most `max_points`."""
    records, _ = read_metrics(run_dir)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for r in _by_step(records):
        if since_step is not None and r["step"] < since_step:
            continue
        if until_step is not None and r["step"] > until_step:
            continue
        out.setdefault(str(r.get("split")), []).append(r)
    return {split: downsample(rows, max_points) for split, rows in out.items()}


def current(run_dir: str | Path) -> dict[str, Any]:
    """The latest train and val records, and the step."""
    status = read_status(run_dir) or {}
    records, _ = read_metrics(run_dir)
    latest: dict[str, Any] = {"train": None, "val": None}
    for r in records:
        latest[str(r.get("split"))] = r
    return {"step": status.get("step"), "total_steps": status.get("total_steps"), **latest}


def throughput(run_dir: str | Path) -> dict[str, Any]:
    """tokens/s and samples/s of the latest logged step, the ETA and the progress."""
    status = read_status(run_dir) or {}
    train = status.get("train") or {}
    return {
        "tokens_per_s": train.get("tokens_per_s"),
        "samples_per_s": train.get("samples_per_s"),
        "eta_s": status.get("eta_s"),
        "step": status.get("step"),
        "total_steps": status.get("total_steps"),
        "tokens": status.get("tokens"),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint (or final/) as the API lists it (`asdict` is the JSON object)."""

    id: str
    """The directory's name in the run: step-<N>, or final."""
    step: int | None
    bytes: int
    metric: float | None
    """The run's `checkpoint.metric` in the manifest."""
    best: bool
    """The best checkpoint by that metric."""
    final: bool
    manifest_sha256: str | None


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def complete_checkpoints(run_dir: str | Path, metric: str = "val_loss") -> list[CheckpointInfo]:
    """Complete checkpoints (step, size, the metric, best flag, manifest checksum), and
    final/ when it exists."""
    paths = RunPaths(run_dir)
    entries = [c for c in list_checkpoints(run_dir) if c.complete]
    values = {c.step: ((c.manifest or {}).get("metrics") or {}).get(metric) for c in entries}
    scored = {step: v for step, v in values.items() if isinstance(v, int | float)}
    best = min(scored, key=scored.__getitem__) if scored else None
    found = [
        CheckpointInfo(
            id=c.path.name,
            step=c.step,
            bytes=_size(c.path),
            metric=values[c.step],
            best=c.step == best,
            final=False,
            manifest_sha256=_sha256(c.path / MANIFEST),
        )
        for c in entries
    ]
    if paths.final.is_dir():
        step = (read_status(run_dir) or {}).get("step")
        found.append(
            CheckpointInfo(paths.final.name, step, _size(paths.final), None, False, True, None)
        )
    return found


def checkpoint_dir(run_dir: str | Path, checkpoint: str) -> Path | None:
    """The directory of checkpoint `step-N` or `final` of a run (a name
    `complete_checkpoints` lists), when it is complete."""
    paths = RunPaths(run_dir)
    if checkpoint == paths.final.name:
        return paths.final if paths.final.is_dir() else None
    for c in list_checkpoints(run_dir):
        if c.complete and c.path.name == checkpoint:
            return c.path
    return None


def tar_stream(directory: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """`directory` as an uncompressed tar, produced in chunks (files read as they are sent)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for path in sorted(directory.rglob("*")):
            if not path.is_file():
                continue
            info = tar.gettarinfo(
                str(path), arcname=f"{directory.name}/{path.relative_to(directory)}"
            )
            with path.open("rb") as f:
                tar.addfile(info, f)
            if buffer.tell() >= chunk:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()
