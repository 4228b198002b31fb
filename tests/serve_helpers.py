"""What the `kiln serve` tests share: a real server on 127.0.0.1 in a subprocess, and a tiny
job's config."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import free_port, gloo_env, make_rows, tiny_raw, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-the-test"


def serve_config(tmp: Path) -> dict[str, Any]:
    write_jsonl(tmp / "train.jsonl", make_rows(80, seed=5))
    write_jsonl(tmp / "val.jsonl", make_rows(12, seed=6))
    raw = tiny_raw(tmp, tmp / "train.jsonl", tmp / "val.jsonl")
    del raw["output_dir"]  # the server gives each job its run directory
    del raw["data"]["cache_dir"]  # the server's: <state>/cache
    raw["optim"] = {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"}
    raw["train"] = {"max_steps": 16, "batch_size": 4, "num_threads": 1}
    raw["eval"] = {"every_steps": 8}
    raw["checkpoint"] = {"every_steps": 2, "keep_last": 2, "every_minutes": None}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    return raw


class Server:
    def __init__(self, state: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = state.with_suffix(".log")
        # --allow-read: the tests' data files lie beside the state directory
        cmd = [
            sys.executable,
            "-m",
            "kiln",
            "serve",
            "--port",
            str(self.port),
            "--state-dir",
            str(state),
            "--token",
            TOKEN,
            "--allow-read",
            str(state.parent),
            *extra,
        ]
        env = gloo_env()  # its jobs' ranks (--nproc) talk over loopback
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def losses(run_dir: str) -> list[float]:
    rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]
