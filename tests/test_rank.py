"""The rank context: a no-op at world size 1, and the real thing on 2 gloo ranks (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.data import BatchCursor
from kiln.rank import RankContext

SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from kiln.data import BatchCursor
from kiln.rank import RankContext

dist.init_process_group("gloo")
rank = RankContext.current()
total = rank.all_reduce_sum(torch.tensor(float(rank.rank + 1)))
cursor = BatchCursor(40, 4, seed=3, rank=rank.rank, world_size=rank.world_size)
batches = [cursor.next_indices().tolist() for _ in range(12)]  # crosses an epoch
rank.barrier()
out = {"rank": rank.rank, "world": rank.world_size, "local": rank.local_rank,
       "main": rank.is_main, "sum": total.item(), "batches": batches}
with open(f"{sys.argv[1]}/rank{rank.rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_world_size_one_is_a_no_op() -> None:
    rank = RankContext()
    assert (rank.rank, rank.world_size, rank.is_main, rank.distributed) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert rank.all_reduce_sum(t) is t
    assert t.tolist() == [1.0, 2.0]
    rank.barrier()
    model = torch.nn.Linear(2, 2)
    with rank.no_sync(model):  # a plain module has no no_sync: backward runs as usual
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None
    assert model.weight.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_sum_and_split_the_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["local"], r["main"]) for r in ranks] == [
        (0, 2, 0, True),
        (1, 2, 1, False),
    ]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]  # 1 + 2, on every rank
    # World 2 x batch 4 draws exactly the samples of world 1 x batch 8, rank 0 first.
    single = BatchCursor(40, 8, seed=3)
    for step in range(12):
        assert ranks[0]["batches"][step] + ranks[1]["batches"][step] == (
            single.next_indices().tolist()
        )


def test_a_stop_requested_while_the_ranks_sync_is_agreed_at_the_next_sync() -> None:
    from kiln.engine.control import Control, StopRequest

    control = Control()
    late = StopRequest("signal", "signal SIGTERM", resumable=True)

    class TwoRanks:
        distributed = True

        def __init__(self, during: StopRequest | None) -> None:
            self.during = during

        def all_gather(self, mine: Any, what: str | None = None) -> list[Any]:
            if self.during is not None:  # a signal handler runs in the middle of the gather
                control.request_stop(self.during)
            return [mine, (None, False, mine[2])]  # the other rank: no request, same counts

    assert control.sync(TwoRanks(late), (3, 1)) == (6, 2)  # type: ignore[arg-type]
    assert control.decided is None  # not agreed yet: no rank acts on it alone
    assert control.stop is late  # ... and it is not lost
    control.sync(TwoRanks(None), (0, 0))  # type: ignore[arg-type]
    assert control.decided is late
