"""`kiln serve` under load: does watching a job slow the job, and how fast does the API answer?

One server on 127.0.0.1 runs one training job twice, one after the other with the same
config: once with nobody watching (quiet), once while 20 clients follow its event stream and
other clients send 50 requests/s (status, metrics, history with max_points, throughput,
checkpoints) for the whole run (loaded). Reported: the job's median step time in each phase
(from the `elapsed_s` its metrics.jsonl records, so the job measures itself) and their ratio,
the requests' p50/p99 latency and error count, and the stream clients' events.

    .venv/bin/python benchmarks/serve_load.py [--steps 400] [--rate 50] [--streams 20]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _config(tmp: Path, steps: int) -> dict:
    from helpers import make_rows, tiny_raw, write_jsonl

    write_jsonl(tmp / "train.jsonl", make_rows(400, seed=1))
    write_jsonl(tmp / "val.jsonl", make_rows(20, seed=2))
    raw = tiny_raw(tmp, tmp / "train.jsonl", tmp / "val.jsonl")
    del raw["output_dir"], raw["data"]["cache_dir"]  # the server's (under its state dir)
    raw["train"] = {"max_steps": steps, "batch_size": 8, "num_threads": 1}
    raw["eval"] = {"every_steps": max(1, steps // 4)}
    raw["checkpoint"] = {"every_steps": max(1, steps // 4), "every_minutes": None}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    return raw


def _step_times(run_dir: str) -> list[float]:
    rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    stamps = [r["elapsed_s"] for r in rows if r["split"] == "train" and "elapsed_s" in r]
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--streams", type=int, default=20, help="event-stream clients")
    args = parser.parse_args()

    import httpx
    from helpers import free_port

    from kiln.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="kiln-serve-load-"))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "kiln", "serve", "--port", str(port),
                               "--state-dir", str(tmp / "state"), "--allow-read", str(tmp)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        api = Client(url)
        raw = _config(tmp, args.steps)
        quiet = api.start(config=raw, name="quiet")
        api.wait(quiet["id"], "succeeded", "failed", timeout_s=3600)

        loaded = api.start(config=raw, name="loaded")
        api.wait(loaded["id"], "running", timeout_s=600)
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[str] = []
        events = [0] * args.streams

        def stream(i: int) -> None:
            try:
                for _ in Client(url).events(loaded["id"]):
                    events[i] += 1
            except Exception as exc:
                errors.append(f"stream: {exc}")

        job = f"/api/training/jobs/{loaded['id']}"
        paths = [f"{job}/status", f"{job}/metrics", f"{job}/metrics/history?max_points=200",
                 f"{job}/throughput", f"{job}/checkpoints", "/api/training/jobs"]  # fmt: skip

        def requests(worker: int, workers: int) -> None:
            http = httpx.Client(base_url=url, timeout=30)
            period, n = workers / args.rate, worker
            next_at = time.perf_counter()
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    r = http.get(paths[n % len(paths)])
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {paths[n % len(paths)]}")
                except httpx.HTTPError as exc:
                    errors.append(str(exc))
                latencies.append(time.perf_counter() - start)
                n += 1
                next_at += period
                time.sleep(max(0.0, next_at - time.perf_counter()))

        threads = [threading.Thread(target=stream, args=(i,), daemon=True)
                   for i in range(args.streams)]  # fmt: skip
        threads += [threading.Thread(target=requests, args=(w, 5), daemon=True) for w in range(5)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        api.wait(loaded["id"], "succeeded", "failed", timeout_s=3600)
        stop.set()
        took = time.perf_counter() - began
        for t in threads:
            t.join(timeout=10)

        q, l_ = _step_times(quiet["run_dir"]), _step_times(api.status(loaded["id"])["run_dir"])
        lat = sorted(latencies)
        p = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000  # noqa: E731
        print(f"steps {args.steps}, {args.streams} stream clients, {args.rate:g} requests/s "
              f"for {took:.0f}s ({len(lat) / took:.1f}/s sent)")  # fmt: skip
        print(f"step time median: quiet {statistics.median(q) * 1000:.2f} ms, loaded "
              f"{statistics.median(l_) * 1000:.2f} ms, ratio "
              f"{statistics.median(l_) / statistics.median(q):.3f}")  # fmt: skip
        print(f"request latency: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max "
              f"{lat[-1] * 1000:.1f} ms; errors {len(errors)} {errors[:3]}")  # fmt: skip
        print(f"stream events per client: min {min(events)}, max {max(events)}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
