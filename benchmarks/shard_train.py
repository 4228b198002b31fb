"""Training from token shards (`data.storage: shards`) against today's in-memory dataset.

Two measurements, each side by side in one run:

1. **Training tokens/s** on the quickstart model (configs/quickstart.yaml: GPT-2 4 x 128, blocks
   of 256, batch 16) over the bundled recipes, `data.storage: memory` vs `shards` (the same
   examples and batches: tests/test_shard_train.py checks the losses are bit-identical).
   Interleaved rounds, order rotated each round; each contender's timed steps follow untimed
   warm-up steps in the same `fit()`; the median tokens/s of each over the rounds and the
   ratio shards / memory (goal >= 0.98); and shards with `--loader-workers` processes building
   the batches ahead (`data.loader_workers`, default 1). Also the batch gather alone
   (`Batcher` over the train set, the loop's only data work) per batch, for both storages.
2. **Time to the first step** of `kiln train` (a fresh process, `train.max_steps: 1`) on
   prepared shard sets of each `--sizes` (default 10M and 1B tokens): the wall time of the
   whole command and the time its log gives to the first step, median of `--repeats`. The goal:
   1B within 5 s of 10M. The sets are synthesized straight into the config's shard directory
   (random token ids, document lengths drawn around `--doc-tokens`) with `ShardWriter`, which is
   what `kiln data prepare` writes; what training reads at start (manifest, offsets and their
   sha256, the document split) is then exactly as for a tokenized corpus, and no tokenizer time
   is spent making 1B tokens (benchmarks/data_scale.py measures prepare itself).

    .venv/bin/python benchmarks/shard_train.py                      # both, ~10 min (1B: 2 GB)
    .venv/bin/python benchmarks/shard_train.py --skip-startup       # tokens/s only, ~3 min
    .venv/bin/python benchmarks/shard_train.py --sizes 1M,10M --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kiln import Callback, Trainer, load_config

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "kiln-shard-train"


def _size(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}
    t = text.strip().lower()
    return int(float(t[:-1]) * scale[t[-1]]) if t[-1] in scale else int(t)


def _label(n: int) -> str:
    for unit, value in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= value and n % value == 0:
            return f"{n // value}{unit}"
    return str(n)


def tokenizer_dir(root: Path) -> Path:
    """The quickstart's tokenizer (BPE on its training recipes), saved once: shards need a
    tokenizer to load."""
    path = root / "tokenizer"
    if not (path / "tokenizer.json").exists():
        from kiln.data import load_splits
        from kiln.data.assemble import tokenizer_corpus
        from kiln.models import build_tokenizer

        cfg = load_config(QUICKSTART)
        rows, _, _ = load_splits(cfg)
        build_tokenizer(cfg, tokenizer_corpus(cfg, rows)).save_pretrained(path)
    return path


def quickstart_raw(root: Path, storage: str, steps: int) -> dict[str, Any]:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["output_dir"] = str(root / f"run-{storage}")
    raw["tokenizer"] = {"name_or_path": str(tokenizer_dir(root))}
    raw["data"].update(
        train=str(ROOT / raw["data"]["train"]),
        val=None,
        val_split=0.0,
        storage=storage,
        cache_dir=str(root / "cache"),
    )
    raw["train"]["max_steps"] = steps
    raw["optim"]["warmup_ratio"] = 0.0
    raw["eval"] = {"every_steps": None}
    raw["checkpoint"] = {"every_steps": None, "every_minutes": None}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    return raw


class _Stamps(Callback):
    """Times the steps after `skip` warm-up steps."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.end = skip, 0.0, 0.0

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


CONTENDERS = {"memory": ("memory", 0), "shards": ("shards", 0)}


def contenders(loader_workers: list[int]) -> dict[str, tuple[str, int]]:
    """name -> (data.storage, data.loader_workers): memory, shards, and shards with each
    `--loader-workers` count."""
    return {**CONTENDERS, **{f"shards-w{w}": ("shards", w) for w in loader_workers if w}}


def throughput(
    root: Path, rounds: int, steps: int, warmup: int, loader_workers: list[int]
) -> dict[str, Any]:
    """Median training tokens/s of each contender over interleaved rounds, and each one's
    ratio to memory."""
    sides = contenders(loader_workers)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        names = list(sides)
        order = names[r % len(names) :] + names[: r % len(names)]  # rotated each round
        for name in order:
            storage, workers = sides[name]
            raw = quickstart_raw(root, storage, warmup + steps)
            raw["data"]["loader_workers"] = workers
            cfg = load_config(data=raw)
            stamps = _Stamps(warmup)
            Trainer(cfg, callbacks=[stamps], overwrite=True).fit()
            tokens = cfg.train.batch_size * cfg.data.max_length
            rates[name].append(steps * tokens / (stamps.end - stamps.start))
            print(f"  round {r + 1} {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {k: v / med["memory"] for k, v in med.items()}
    return {"tokens_per_s": med, "all": rates, "ratio": ratios["shards"], "ratios": ratios}


def gather_cost(root: Path, batches: int) -> dict[str, float]:
    """Microseconds per training batch gathered by the Batcher from each storage's dataset."""
    from kiln.data.assemble import Given, assemble_data
    from kiln.data.collate import Batcher

    out = {}
    for storage in ("memory", "shards"):
        cfg = load_config(data=quickstart_raw(root, storage, 1))
        data = assemble_data(cfg, Given())
        batcher = Batcher(cfg.task, 0)
        gen = torch.Generator().manual_seed(0)
        idx = [torch.randint(len(data.train), (16,), generator=gen) for _ in range(batches)]
        start = time.perf_counter()
        for i in idx:
            batcher(data.train, i)
        out[storage] = (time.perf_counter() - start) / batches * 1e6
    return out


def synthesize(root: Path, tokens: int, doc_tokens: int, seed: int) -> Path:
    """A config whose shard set (at its own key) holds `tokens` synthetic tokens."""
    from kiln.data.cache import tokenizer_fingerprint
    from kiln.data.shards.prepare import STATS, check_supported, shard_dir
    from kiln.data.shards.writer import ShardWriter
    from kiln.files import json_text
    from kiln.models import build_tokenizer

    label = _label(tokens)
    source = root / f"placeholder-{label}.jsonl"  # its identity keys the set; never read
    if not source.exists():
        source.write_text(json.dumps({"text": f"placeholder for {label} synthetic tokens"}) + "\n")
    raw = quickstart_raw(root, "shards", 1)
    raw["output_dir"] = str(root / f"run-{label}")
    raw["data"].update(train=str(source), val_split=0.0005)
    raw["eval"] = {"every_steps": None, "max_batches": 1}
    config = root / f"startup-{label}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    tok = build_tokenizer(cfg, None)
    fp = tokenizer_fingerprint(tok)
    directory, key = shard_dir(cfg, check_supported(cfg), fp, cfg.data.shard_tokens)
    if (directory / "manifest.json").exists():
        return config
    print(f"  writing {label} synthetic tokens to {directory}", flush=True)
    rng = np.random.default_rng(seed)
    vocab = len(tok)
    with ShardWriter(
        directory, vocab, key, fp, shard_tokens=cfg.data.shard_tokens, durable=False
    ) as writer:
        left, docs = tokens, 0
        while left > 0:
            lengths = rng.geometric(1 / doc_tokens, size=65536).clip(2, 8 * doc_tokens)
            ids = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.uint16)
            for doc in np.split(ids, np.cumsum(lengths)[:-1]):
                writer.add(doc[:left])
                left -= min(doc.size, left)
                docs += 1
                if left == 0:
                    break
        stats = {"rows_read": docs, "documents": docs, "tokens": tokens, "synthetic": True}
        (directory / STATS).write_text(json_text(stats, indent=1) + "\n")
        writer.close()
    return config


def startup(config: Path, repeats: int) -> dict[str, float]:
    """Median seconds from starting `kiln train CONFIG` (a fresh process, one step, a fresh run
    directory each time) to its first metrics record (step 1), and to its exit."""
    firsts, walls = [], []
    for i in range(repeats):
        run = config.parent / f"{config.stem}-run{i}"
        if run.exists():
            shutil.rmtree(run)
        metrics = run / "metrics.jsonl"
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "-q", "train", str(config), f"output_dir={run}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
            time.sleep(0.01)
        firsts.append(time.perf_counter() - start)
        _, err = proc.communicate()
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"kiln train {config} failed:\n{err[-2000:]}")
    return {"first_step_s": statistics.median(firsts), "wall_s": statistics.median(walls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_CACHE, help="where sets are kept")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps a contender a round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--loader-workers", default="1", help="shards with these data.loader_workers counts too"
    )
    parser.add_argument("--gather-batches", type=int, default=2000)
    parser.add_argument("--sizes", default="10M,1B", help="startup: shard set sizes")
    parser.add_argument("--doc-tokens", type=int, default=400, help="mean document length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    report: dict[str, Any] = {"machine": machine}
    print(report["machine"], flush=True)
    if not args.skip_throughput:
        print("training tokens/s, quickstart model (memory vs shards):", flush=True)
        workers = [int(w) for w in args.loader_workers.split(",") if w]
        report["throughput"] = t = throughput(
            args.root, args.rounds, args.steps, args.warmup, workers
        )
        report["gather_us"] = g = gather_cost(args.root, args.gather_batches)
        print("| contender | tokens/s | / memory | gather us/batch |\n|---|---|---|---|")
        for name in t["tokens_per_s"]:
            gather = g.get(name)
            print(
                f"| {name} | {t['tokens_per_s'][name]:,.0f} | {t['ratios'][name]:.3f} | "
                f"{'-' if gather is None else format(gather, '.0f')} |",
                flush=True,
            )
    if not args.skip_startup:
        print("kiln train to the first step, by prepared set size:", flush=True)
        report["startup"] = {}
        for size in [_size(s) for s in args.sizes.split(",")]:
            config = synthesize(args.root, size, args.doc_tokens, seed=0)
            got = startup(config, args.repeats)
            report["startup"][_label(size)] = got
            print(
                f"| {_label(size)} | to the first step {got['first_step_s']:.2f} s | whole "
                f"command {got['wall_s']:.2f} s |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
