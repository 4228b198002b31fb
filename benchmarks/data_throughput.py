"""Tokenize + pack throughput of kiln's data pipeline against a bare `tokenizers` call.

Contenders, all over the same texts (the bundled recipes, repeated to `--mb` MB) with the same
byte-level BPE tokenizer, on the same cores, interleaved round-robin (order rotated each round):

- bare:    `Tokenizer.encode_batch(texts, add_special_tokens=False)`, ids taken out as lists:
           what any pipeline must at least do (the ratio's reference).
- bare_fast: the same with `encode_batch_fast` (no character offsets), which kiln's `encode`
           uses for fast tokenizers: the ceiling of the Rust side.
- causal:  `kiln.data.tokenize.tokenize_causal(texts, tokenizer, max_length, packing=True)`:
           tokenize, append EOS, pack into blocks (document starts included).
- build:   `kiln.data.build_datasets` with `data.cache_dir: null`: render the rows, tokenize,
           pack, count, for train and val.
- hit:     `build_datasets` again with the cache on, after one untimed run filled it: hash the
           rendered texts and load the saved tensors.

Reported: median seconds, MB/s of UTF-8 text, tokens/s, and each contender's speed relative to
bare (the goal for causal and build: >= 0.85).

    .venv/bin/python benchmarks/data_throughput.py [--mb 8] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers

from kiln.config import load_config
from kiln.data import build_datasets
from kiln.data.tokenize import tokenize_causal
from kiln.models.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "data" / "recipes.jsonl"


def load_rows(mb: float) -> list[dict[str, Any]]:
    """The recipe rows, repeated until their texts hold `mb` MB (each copy made distinct)."""
    base = [json.loads(line) for line in RECIPES.read_text().splitlines() if line.strip()]
    size = sum(len(r["text"].encode()) for r in base)
    copies = max(1, round(mb * 1e6 / size))
    return [
        {**r, "text": r["text"] if c == 0 else f"{r['text']}\n({c})"}
        for c in range(copies)
        for r in base
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="text size in MB (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per packed block")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--json", type=Path, help="also write all timings here")
    args = parser.parse_args(argv)
    logging.getLogger("kiln").setLevel(logging.WARNING)

    rows = load_rows(args.mb)
    texts = [r["text"] for r in rows]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = train_bpe_tokenizer(texts[:3000], args.vocab)
    backend = tokenizer.backend_tokenizer
    tmp = tempfile.TemporaryDirectory()
    data = {"train": str(RECIPES), "max_length": args.max_length, "dedup": False}
    base = {
        "name": "bench",
        "output_dir": str(Path(tmp.name) / "run"),
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 1},
        "train": {"max_steps": 1},
    }
    uncached = load_config(data={**base, "data": {**data, "cache_dir": None}})
    cached = load_config(data={**base, "data": {**data, "cache_dir": str(Path(tmp.name) / "c")}})
    split = len(rows) * 95 // 100
    tokens = sum(len(e.ids) + 1 for e in backend.encode_batch(texts, add_special_tokens=False))

    contenders: dict[str, Callable[[], object]] = {
        "bare": lambda: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)],
        "bare_fast": lambda: [
            e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)
        ],
        "causal": lambda: tokenize_causal(texts, tokenizer, args.max_length, packing=True),
        "build": lambda: build_datasets(uncached, tokenizer, rows[:split], rows[split:]),
        "hit": lambda: build_datasets(cached, tokenizer, rows[:split], rows[split:]),
    }
    for fn in contenders.values():  # warm up; fills the cache for "hit"
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)

    print(
        f"{mb:.2f} MB, {len(texts)} texts, {tokens} tokens (EOS included), "
        f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, "
        f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}"
    )
    bare = statistics.median(times["bare"])
    print(f"{'contender':<10}{'median s':>10}{'MB/s':>9}{'Mtok/s':>9}{'vs bare':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<10}{med:>10.3f}{mb / med:>9.2f}{tokens / med / 1e6:>9.3f}{bare / med:>9.3f}")
    build = statistics.median(times["build"])
    print(
        f"cache hit loads in {statistics.median(times['hit']):.3f}s, "
        f"{build / statistics.median(times['hit']):.1f}x faster than tokenizing ({build:.3f}s)"
    )
    if args.json:
        info = {"mb": mb, "texts": len(texts), "tokens": tokens, "times": times}
        info["platform"] = platform.platform()
        args.json.write_text(json.dumps(info, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
