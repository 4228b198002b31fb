"""CPU seconds from `kiln train` to its first logged step, against a bare transformers script.

Both sides do the same work up to their first optimizer step, on the quickstart's data, with a
tiny GPT-2 (2 x 64, vocab 2048, blocks of 256, batch 16): read the training and validation
recipes, train a byte-level BPE tokenizer on the training text, tokenize both files, pack them
into blocks, build the model from its config, and take one AdamW step.

- kiln: `kiln train configs/quickstart.yaml` with tiny overrides (`log.every_steps=1`, no
  validation, samples or checkpoints before the end); the first step is the first line of
  metrics.jsonl. kiln does more than the bare script on the way (config validation, the
  quality filter, the run directory and its status file, data statistics, the token cache);
  it is measured as a user runs it.
- bare: this file with `--bare` (torch, tokenizers and transformers, nothing of kiln); the
  first step is its `step 1` line on stdout.

Each side runs as a fresh process; the CPU time of its whole process tree (user + system, from
/proc) is read the moment its first step appears, then it is stopped. Pairs are interleaved
(alternating which goes first), so a drift in machine speed hits both alike; the report gives
the median of the per-pair ratios kiln/bare and their spread. `--cache cold` (the default)
gives each kiln run an empty `data.cache_dir`, so it trains its tokenizer and tokenizes as the
bare script does every time; `--cache warm` lets kiln reuse its token cache after the first
run, as a user's second run would.

    .venv/bin/python benchmarks/startup.py [--pairs 5] [--cache cold|warm] [--json FILE]

Linux only (/proc). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
TRAIN = ROOT / "examples" / "data" / "recipes.jsonl"
VAL = ROOT / "examples" / "data" / "recipes_val.jsonl"
WIDTH, LAYERS, HEADS, VOCAB, BLOCK, BATCH, LR = 64, 2, 2, 2048, 256, 16, 2e-3

KILN_OVERRIDES = (
    f"model.hidden_size={WIDTH}",
    f"model.num_layers={LAYERS}",
    f"model.num_heads={HEADS}",
    "train.max_steps=100000",  # stopped at its first step
    "log.every_steps=1",
    "log.progress=none",
    "eval.every_steps=null",
    "eval.generate.num_samples=0",
    "eval.sample_prompt=null",
    "checkpoint.every_steps=null",
)
TICK = os.sysconf("SC_CLK_TCK")


# ---- the bare script -------------------------------------------------------------------------


def bare() -> None:
    """What a user writes without an engine: the quickstart's recipes to one AdamW step."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    def texts(path: Path) -> list[str]:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [
            f"Title: {r['title']}\nIngredients:\n"
            + "\n".join(r["ingredients"])
            + "\nSteps:\n"
            + "\n".join(r["steps"])
            for r in rows
        ]

    train, val = texts(TRAIN), texts(VAL)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        train,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    eos = tokenizer.token_to_id("<|endoftext|>")

    def blocks(docs: list[str]) -> torch.Tensor:
        ids = [t for enc in tokenizer.encode_batch(docs) for t in [*enc.ids, eos]]
        n = len(ids) // BLOCK
        return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)

    train_blocks, _val_blocks = blocks(train), blocks(val)
    torch.manual_seed(42)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    order = torch.randperm(len(train_blocks))
    ids = train_blocks[order[:BATCH]]
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"step 1 loss {loss.item():.4f}", flush=True)
    time.sleep(60)  # stopped by the harness


# ---- the harness (stdlib only) ---------------------------------------------------------------


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and every live descendant, plus the children it
    has already reaped (from /proc)."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = fields
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    ticks = 0
    for pid in tree:
        fields = stats.get(pid)
        if fields:  # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 here
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / TICK


def first_step_cpu(
    cmd: list[str], started: Callable[[bytes], bool], *, cwd: Path, timeout: float = 600
) -> float:
    """Start `cmd`, wait until `started(its output so far)` is true, read its tree's CPU
    seconds, stop it."""
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        output = bytearray()
        try:
            while not started(bytes(output)):
                with contextlib.suppress(BlockingIOError):  # drained, so it never blocks
                    output.extend(os.read(proc.stdout.fileno(), 1 << 16))
                if proc.poll() is not None:
                    rest = output.decode(errors="replace")
                    raise RuntimeError(f"{cmd[:3]} ended ({proc.returncode}) first:\n{rest}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[:3]}: no first step in {timeout:.0f} s")
                time.sleep(0.005)
            return tree_cpu_s(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kiln_run(work: Path, index: int, cache: str) -> float:
    out = work / f"run-{index}"
    cache_dir = work / ("cache" if cache == "warm" else f"cache-{index}")
    metrics = out / "metrics.jsonl"

    def started(_: bytes) -> bool:
        return metrics.exists() and '"split": "train"' in metrics.read_text()

    kiln = Path(sys.executable).with_name("kiln")
    cmd = [str(kiln), "train", str(CONFIG), *KILN_OVERRIDES]
    cmd += [f"output_dir={out}", f"data.cache_dir={cache_dir}"]
    return first_step_cpu(cmd, started, cwd=ROOT)


def bare_run() -> float:
    def started(output: bytes) -> bool:
        return b"step 1 loss" in output

    return first_step_cpu([sys.executable, __file__, "--bare"], started, cwd=ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="interleaved kiln/bare pairs (5)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        bare()
        return
    kiln_s: list[float] = []
    bare_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kiln-startup-") as tmp:
        work = Path(tmp)
        if args.cache == "warm":
            kiln_run(work, -1, "warm")  # fills the cache: not timed
        for i in range(args.pairs):
            sides = [("kiln", lambda i=i: kiln_run(work, i, args.cache)), ("bare", bare_run)]
            for name, run in sides if i % 2 == 0 else sides[::-1]:
                (kiln_s if name == "kiln" else bare_s).append(run())
            print(f"pair {i + 1}: kiln {kiln_s[-1]:.2f} s, bare {bare_s[-1]:.2f} s", flush=True)
    ratios = [k / b for k, b in zip(kiln_s, bare_s, strict=True)]
    report: dict[str, Any] = {
        "cache": args.cache,
        "pairs": args.pairs,
        "kiln_cpu_s": kiln_s,
        "bare_cpu_s": bare_s,
        "kiln_median_s": statistics.median(kiln_s),
        "bare_median_s": statistics.median(bare_s),
        "ratios": ratios,
        "kiln_over_bare": statistics.median(ratios),
    }
    print(
        f"\nCPU s to the first step ({args.cache} cache): kiln {report['kiln_median_s']:.2f}, "
        f"bare {report['bare_median_s']:.2f}; kiln/bare = {report['kiln_over_bare']:.3f} "
        f"(pairs {min(ratios):.3f} .. {max(ratios):.3f})"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
