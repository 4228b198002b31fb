"""Checkpoint save and load time: kiln's CheckpointManager against bare safetensors + torch.save.

One process builds a GPT-2 (default 8 layers, 768 wide, vocab 8192: ~63M parameters), sets up
a real `kiln.Trainer` on it and takes one AdamW step by hand, so the optimizer holds its moment
estimates (a checkpoint ~3x the fp32 weights). Then, interleaved over several rounds, it saves
and loads that state with:

- kiln:  `CheckpointManager(root).save(step, checkpoint_writers(trainer), ...)`, what a run
  does at a checkpoint step (staging directory, every file fsynced and crc32-checksummed,
  manifest, rename, directory fsyncs, rotation); load = `CheckpointManager.verify(path)` +
  `restore_checkpoint(trainer, path)`, what a resume does.
- bare:  `safetensors.torch.save_file(weights)` + `torch.save(optimizer.state_dict())`;
  load = `load_file` + `torch.load` + `model.load_state_dict` + `optimizer.load_state_dict`.
  No fsync, no checksum: the bytes sit in the page cache when the timer stops.
- bare+fsync (save only, a reference): bare, then fsync both files and the directory. The
  least a save that survives a power cut can cost; kiln cannot beat it.

Every save goes into a fresh directory in one temp dir (one filesystem for all), so no contender
pays for another's files; deleting them and `os.sync()` run untimed between contenders, so each
starts with no dirty pages pending. Loads read what the same contender just wrote, from the page
cache (`--cold` evicts the files first, so loads read the disk). The order of the contenders
alternates each round. kiln's save is instrumented (its writers wrapped, `os.fsync` and kiln's
crc32 timed) to split its time into write, fsync and checksum.

    .venv/bin/python benchmarks/checkpoint_io.py [--rounds 5] [--json out.json]
    .venv/bin/python benchmarks/checkpoint_io.py --layers 4 --width 512 --vocab 8192 --cold
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from _common import gpt2, kiln_config
from safetensors.torch import load_file, save_file

import kiln
import kiln.checkpoint
from kiln import Trainer
from kiln.checkpoint import CheckpointManager
from kiln.config import config_hash
from kiln.engine.resume import checkpoint_writers, restore_checkpoint
from kiln.models import train_bpe_tokenizer

SAVERS = ("bare", "bare+fsync", "kiln")
LOADERS = ("bare", "kiln")
GOAL = 1.3
MB = 1e6
# What kiln.checkpoint hashes with, to time it: a piece of a file (pieces are hashed in parallel
# threads) or, before the pipelined save, a whole file.
CHECKSUM_FN = "_crc_range" if hasattr(kiln.checkpoint, "_crc_range") else "file_checksum"


# ---- the state to checkpoint -------------------------------------------------------------------


def make_trainer(args: argparse.Namespace, out: Path) -> Trainer:
    """A set-up kiln Trainer on a seeded GPT-2 whose AdamW has taken one step."""
    model = gpt2(args)
    cfg = kiln_config(
        "checkpoint-io",
        args,
        out,
        optim={"warmup_steps": 0},
        train={"max_steps": 1, "batch_size": 2},
        log={},
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, args.vocab, (4, args.seq_len), generator=gen)  # (N, T)
    trainer = Trainer(
        cfg,
        model=model,
        tokenizer=train_bpe_tokenizer(["benchmark"], vocab_size=260),
        train_data=data,
    )
    trainer.setup()
    # One optimizer step by hand (fit() would also write final/ and sample): AdamW state exists.
    ids = data[:2]  # (B, T)
    trainer.model(input_ids=ids, labels=ids).loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.step = 1
    return trainer


def bare_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with tied tensors once: `save_file` refuses tensors sharing memory."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


# ---- contenders ----------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bare_save(trainer: Trainer, out: Path, *, durable: bool = False) -> Path:
    out.mkdir()
    save_file(bare_weights(trainer.model), str(out / "model.safetensors"))
    torch.save(trainer.optimizer.state_dict(), out / "optimizer.pt")
    if durable:
        for name in ("model.safetensors", "optimizer.pt", "."):
            fsync_path(out / name)
    return out


def bare_load(trainer: Trainer, path: Path) -> None:
    weights = load_file(str(path / "model.safetensors"))
    trainer.model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to wte
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


@contextmanager
def kiln_parts(parts: dict[str, float]) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """Time kiln's save by part: writers, `os.fsync` (files and directories), checksums.

    Yields a function that wraps a writers dict. Seconds accumulate into `parts`, summed over
    threads: kiln fsyncs and hashes in background threads while the next file is written, so
    the parts add up to more than the save's wall time.
    """
    lock = threading.Lock()
    real_fsync, real_checksum = os.fsync, getattr(kiln.checkpoint, CHECKSUM_FN)

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                with lock:
                    parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0

        return run

    os.fsync = timed("fsync", real_fsync)
    setattr(kiln.checkpoint, CHECKSUM_FN, timed("checksum", real_checksum))
    try:
        yield lambda writers: {name: timed("write", w) for name, w in writers.items()}
    finally:
        os.fsync = real_fsync
        setattr(kiln.checkpoint, CHECKSUM_FN, real_checksum)


def evict(path: Path) -> None:
    """Drop the directory's (clean, synced) pages from the page cache: the next read hits disk."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(prefix="kiln-checkpoint-io-", dir=base) as tmp_name:
        tmp = Path(tmp_name)
        trainer = make_trainer(args, tmp / "run")
        n_params = sum(p.numel() for p in bare_weights(trainer.model).values())
        chash = config_hash(trainer.cfg)
        save_s: dict[str, list[float]] = {k: [] for k in SAVERS}
        load_s: dict[str, list[float]] = {k: [] for k in LOADERS}
        kiln_save_parts: list[dict[str, float]] = []
        kiln_load_parts: list[dict[str, float]] = []
        sizes: dict[str, dict[str, float]] = {}
        counter = iter(range(1_000_000))

        def one(name: str, timed: bool) -> None:
            out = tmp / f"{name.replace('+', '-')}-{next(counter)}"
            os.sync()  # no dirty pages left from the previous contender
            parts: dict[str, float] = {}
            t0 = time.perf_counter()
            if name == "kiln":
                with kiln_parts(parts) as wrap:
                    path = CheckpointManager(out).save(
                        trainer.state.step, wrap(checkpoint_writers(trainer)), config_hash=chash
                    )
            else:
                path = bare_save(trainer, out, durable=name == "bare+fsync")
            t_save = time.perf_counter() - t0
            sizes[name] = {f.name: f.stat().st_size / MB for f in sorted(path.iterdir())}
            t_verify = t_load = None
            if name in LOADERS:
                if args.cold:
                    os.sync()
                    evict(path)
                t0 = time.perf_counter()
                if name == "kiln":
                    CheckpointManager(out).verify(path)
                    t_verify = time.perf_counter() - t0
                    restore_checkpoint(trainer, path)
                else:
                    bare_load(trainer, path)
                t_load = time.perf_counter() - t0
            shutil.rmtree(out)
            if not timed:
                return
            save_s[name].append(t_save)
            if name == "kiln":
                parts["beyond_write"] = t_save - parts["write"]  # what bare does not do
                kiln_save_parts.append(parts)
                kiln_load_parts.append({"verify": t_verify, "restore": t_load - t_verify})
            if t_load is not None:
                load_s[name].append(t_load)

        for name in SAVERS:  # warmup: first-touch allocations, lazy imports
            one(name, timed=False)
        for r in range(args.rounds):
            order = SAVERS if r % 2 == 0 else SAVERS[::-1]
            for name in order:
                one(name, timed=True)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        # Sanity: a kiln checkpoint restores the exact tensors the bare one holds.
        ref = {k: v.clone() for k, v in bare_weights(trainer.model).items()}
        path = CheckpointManager(tmp / "check").save(1, checkpoint_writers(trainer))
        weights = load_file(str(path / "model.safetensors"))
        same = all(torch.equal(weights[k], v) for k, v in ref.items())

    def summary(times: list[float], mb: float) -> dict[str, Any]:
        med = statistics.median(times)
        return {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "mb": mb,
            "mb_per_s": mb / med,
            "round_s": times,
        }

    mb = {name: sum(files.values()) for name, files in sizes.items()}
    save = {k: summary(v, mb[k]) for k, v in save_s.items()}
    load = {k: summary(v, mb[k]) for k, v in load_s.items()}
    for table in (save, load):
        for s in table.values():
            s["ratio_to_bare"] = s["median_s"] / table["bare"]["median_s"]
    part_names = ("write", "fsync", "checksum", "beyond_write")
    return {
        "benchmark": "checkpoint_io",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "transformers": transformers.__version__,
            "kiln": kiln.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "params": n_params,
        "files_mb": sizes,
        "goal_ratio": GOAL,
        "save": save,
        "load": load,
        "kiln_over_bare": {
            "save": save["kiln"]["median_s"] / save["bare"]["median_s"],
            "load": load["kiln"]["median_s"] / load["bare"]["median_s"],
        },
        # The same ratio inside each round alone (kiln and bare ran seconds apart there).
        "kiln_over_bare_per_round": {
            op: [k / b for k, b in zip(t["kiln"], t["bare"], strict=True)]
            for op, t in (("save", save_s), ("load", load_s))
        },
        "kiln_save_parts_s": {
            p: statistics.median(d.get(p, 0.0) for d in kiln_save_parts) for p in part_names
        },
        "kiln_load_parts_s": {
            p: statistics.median(d[p] for d in kiln_load_parts) for p in ("verify", "restore")
        },
        "kiln_save_parts_per_round": kiln_save_parts,
        "sanity_same_weights": same,
    }


def print_report(report: dict[str, Any]) -> None:
    a = report["args"]
    files = report["files_mb"]["kiln"]
    big = ", ".join(f"{k} {v:.1f}" for k, v in files.items() if v >= 0.1)
    print(
        f"\nGPT-2 {a['layers']}x{a['width']}, vocab {a['vocab']}: {report['params'] / 1e6:.1f}M "
        f"params, AdamW after 1 step; kiln checkpoint {report['save']['kiln']['mb']:.1f} MB "
        f"({big} MB, rest < 0.1 MB)\n{a['rounds']} interleaved rounds, median; loads from "
        f"{'disk (evicted)' if a['cold'] else 'the page cache'}\n"
    )
    head = f"{'op':<6}{'contender':<12}{'median s':>10}{'min':>8}{'max':>8}"
    print(f"{head}{'MB/s':>8}{'vs bare':>9}")
    for op in ("save", "load"):
        for name, s in report[op].items():
            print(
                f"{op:<6}{name:<12}{s['median_s']:>10.3f}{s['min_s']:>8.3f}{s['max_s']:>8.3f}"
                f"{s['mb_per_s']:>8.0f}{s['ratio_to_bare']:>9.2f}"
            )
    parts = report["kiln_save_parts_s"]
    print(
        f"\nkiln save, median s: writers {parts['write']:.3f} (main thread); busy in fsync "
        f"{parts['fsync']:.3f}, in crc32 {parts['checksum']:.3f} (summed over threads)\n"
        f"  wall time beyond the writers {parts['beyond_write']:.3f} (what fsync + crc32 + "
        "manifest + rename add, after the overlap)"
    )
    lp = report["kiln_load_parts_s"]
    print(f"kiln load, median s: verify {lp['verify']:.3f}, restore_checkpoint {lp['restore']:.3f}")
    print()
    for op in ("save", "load"):
        ratio = report["kiln_over_bare"][op]
        rr = report["kiln_over_bare_per_round"][op]
        verdict = "meets" if ratio <= GOAL else "misses"
        print(
            f"kiln/bare {op} = {ratio:.2f}x (per-round {min(rr):.2f} .. {max(rr):.2f}; "
            f"{verdict} the {GOAL}x goal)"
        )
    same = report["sanity_same_weights"]
    print(f"sanity: the kiln checkpoint holds exactly the bare weights: {same}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--dir", help="write checkpoints under this directory (default: system temp)")
    p.add_argument("--cold", action="store_true", help="evict the files before each load")
    p.add_argument("--json", type=Path, help="also write the results (every round) here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.width % args.heads:
        p.error("need --rounds >= 1, --threads >= 1 and --width divisible by --heads")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    logging.getLogger("kiln").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
