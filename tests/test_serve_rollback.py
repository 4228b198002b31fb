"""Issue 27, item 1 (the server's part of the acceptance): a run is rolled back while the server
follows it, and the server shows the rewritten history, not the rows the rollback dropped.

The rollback is the engine's own: `RunDir.resume` cuts metrics.jsonl back to a checkpoint's
step by replacing the file (what an anomaly rollback and a resume do), then the run logs the
later steps again. The new lines have the length of the dropped ones, so the old byte offset
falls on a line start of the new file: only the file's identity shows the rewrite
(`kiln.runs.MetricsTail`), and a follower that reads on from its offset misses steps 3 and 4.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_raw

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from kiln.config import load_config
from kiln.engine.rundir import RunDir
from kiln.serve.api import metrics as metrics_api
from kiln.serve.app import Settings, create_app
from kiln.serve.store import JobRow

OLD = [(step, 1.5) for step in (1, 2, 3, 4)]
"""What the run logged before the rollback to step 2's checkpoint."""
NEW = [(1, 1.5), (2, 1.5), (3, 2.5), (4, 2.5), (5, 2.5), (6, 2.5)]
"""Its history after the rollback: steps 3 and 4 logged again, with other losses."""


def _line(step: int, loss: float) -> dict[str, Any]:
    return {"step": step, "split": "train", "loss": loss, "lr": 0.001}


class _Request:
    """What the event stream asks of its request: whether the client went away."""

    async def is_disconnected(self) -> bool:
        return False


def _parse(text: str) -> list[tuple[str, Any]]:
    """(event, data) of each Server-Sent Event in `text`."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def _losses(events: list[tuple[str, Any]]) -> list[tuple[int, float]]:
    return [(data["step"], data["loss"]) for kind, data in events if kind == "metrics"]


@pytest.fixture
def followed(tmp_path: Path, recipe_files: tuple[Path, Path]) -> tuple[Any, RunDir, Any]:
    """An app (no executor), and a running job whose run logged OLD: (app, run dir, cfg)."""
    app = create_app(Settings(tmp_path / "state", dry_run=True))
    run = tmp_path / "state" / "runs" / "j"
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    rundir = RunDir(run)
    rundir.prepare(cfg, overwrite=False)
    for step, loss in OLD:
        rundir.log_metrics(_line(step, loss))
    rundir.close()
    app.state.store.add_job(
        JobRow(
            id="j",
            name="j",
            config={},
            run_dir=str(run),
            state="running",
            attempt=1,
            resume=False,
            created=time.time(),
        )
    )
    return app, rundir, cfg


def _roll_back(rundir: RunDir, cfg: Any) -> None:
    """The anomaly rollback's rewrite: back to step 2's checkpoint, then steps 3-6 again."""
    rundir.resume(cfg, 2, anomalies=False)
    for step, loss in NEW[2:]:
        rundir.log_metrics(_line(step, loss))
    rundir.close()


@pytest.mark.parametrize("after", [-1, 4], ids=["from-the-start", "after-last-event-id-4"])
def test_item01_the_event_stream_follows_a_rollback_with_the_rewritten_history(
    followed: tuple[Any, RunDir, Any], monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    app, rundir, cfg = followed
    monkeypatch.setattr(metrics_api, "_POLL_S", 0)  # the stream looks again at once
    store = app.state.store
    sent_first = [(step, loss) for step, loss in OLD if step > after]

    async def follow() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        stream = metrics_api._events(store, store.job("j"), after, _Request())
        # The records logged so far, then the job's state; the stream then waits for news.
        before = [_parse(await anext(stream))[0] for _ in range(len(sent_first) + 1)]
        _roll_back(rundir, cfg)  # while the stream is between two looks
        store.update_job("j", state="paused")
        rest = [_parse(chunk)[0] async for chunk in stream]
        return before, rest

    before, rest = asyncio.run(follow())
    assert _losses(before) == sent_first
    assert before[-1][0] == "status"
    # Once the rewrite is seen, the stream sends what the client lacks of the new history:
    # steps 3 and 4 again with their new losses (also to a client that had them before it
    # connected, Last-Event-ID 4), then 5 and 6. A follower reading on from its byte offset
    # would send only 5 and 6.
    assert _losses(rest) == NEW[2:]
    assert [kind for kind, _ in rest][-2:] == ["status", "end"]
    client = dict(OLD)  # what the client had (before it connected, or from the stream)
    client.update(_losses(before + rest))  # it keeps each step's last value
    assert sorted(client.items()) == NEW


def test_item01_the_routes_show_the_rewritten_history(
    followed: tuple[Any, RunDir, Any],
) -> None:
    app, rundir, cfg = followed
    client = TestClient(app)
    history = "/api/training/jobs/j/metrics/history"
    assert [(r["step"], r["loss"]) for r in client.get(history).json()["train"]] == OLD
    _roll_back(rundir, cfg)
    app.state.store.update_job("j", state="paused")  # the stream ends: it can be read whole
    assert [(r["step"], r["loss"]) for r in client.get(history).json()["train"]] == NEW
    latest = client.get("/api/training/jobs/j/metrics").json()["train"]
    assert (latest["step"], latest["loss"]) == NEW[-1]
    events = "/api/training/jobs/j/events"
    assert _losses(_parse(client.get(events).text)) == NEW
    resumed = client.get(events, headers={"Last-Event-ID": "2"}).text  # a reconnecting client
    assert _losses(_parse(resumed)) == NEW[2:]
