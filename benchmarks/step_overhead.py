"""Per-step overhead of kiln's Trainer against a raw PyTorch loop and `transformers.Trainer`.

One process trains three copies of the same tiny GPT-2 (same init, same batches, same fused
AdamW, fp32, grad clip 1.0, constant LR) and times each optimizer step:

- raw:  `model(ids).logits`, token-mean cross-entropy, backward, clip, AdamW step, zero_grad.
- kiln: `kiln.Trainer(...).fit()`, timed by a kiln `Callback` at `on_step_end`.
- hf:   `transformers.Trainer(...).train()`, timed by a `TrainerCallback` at `on_step_end`.

The contenders run interleaved, round-robin, so drift in machine speed hits all of them alike.
kiln hosts the run: ONE `fit()` covers every kiln step, and its callback, at the end of each
kiln block, runs the raw block and the hf block synchronously (alternating which goes first),
then hands control back to kiln. hf cannot pause inside `train()`, so it gets one `train()` per
block on one long-lived `transformers.Trainer` (its optimizer and Adam state carry over).

A step's time is the difference of two consecutive `on_step_end` stamps: everything the loop
does from the end of one step to the end of the next (data, forward, loss, backward, clip,
optimizer, zero_grad, callbacks, periodic logging). Each block runs `steps + 1` steps and the
first is not timed: that step carries the block's start (hf's `train()` setup, kiln resuming
after the nested blocks, caches cooled by the other models). So every contender contributes
exactly `steps` timed steps per round, all of them steady-state.

glibc's allocator is pinned first (`pin_malloc`): by default it hands large freed blocks back
to the OS, so steps page-fault their activations back in, by an amount that depends on heap
layout rather than on the loop (measured here: 0 to 12k faults a step, up to 10% of step time,
different for each contender from run to run). The table reports page faults per step.

`--processes` measures what a user's `kiln train` costs per step as a whole process (its
status file, console and metrics logging, throughput, the divergence guard, everything the CLI
adds): `kiln train configs/quickstart.yaml` (validation, samples and checkpoints off) against
the raw loop above run as a process of its own (`--raw-process N`, random batches of the same
shape), each for `--short` and `--long` steps, interleaved; a step costs
(t_long - t_short) / (long - short), so start-up and the end of the run cancel out. Wall and
CPU seconds (user + system, from the children's rusage) are both reported; each process keeps
freed memory as `kiln train` does (`pin_malloc`).

Run it on a quiet machine (`--tiny` shrinks the model until the loops' own cost shows):

    .venv/bin/python benchmarks/step_overhead.py [--rounds 5] [--steps 20] [--threads 2]
    .venv/bin/python benchmarks/step_overhead.py --tiny --rounds 10 --steps 50
    .venv/bin/python benchmarks/step_overhead.py --quickstart --rounds 5 --steps 10
    .venv/bin/python benchmarks/step_overhead.py --processes --rounds 3 [--short 20 --long 120]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from _common import gpt2, kiln_config
from _processes import print_processes, processes
from transformers import (
    GPT2LMHeadModel,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
)
from transformers import Trainer as HFTrainer

import kiln
from kiln import Callback, Trainer
from kiln.data import BatchCursor, epoch_permutation
from kiln.engine.control import RunView
from kiln.models import train_bpe_tokenizer
from kiln.process import keep_freed_memory

CONTENDERS = ("raw", "kiln", "hf")
LR, WEIGHT_DECAY, BETAS, EPS, CLIP = 3e-4, 0.01, (0.9, 0.999), 1e-8, 1.0


Stamp = tuple[float, int]
"""(time.perf_counter(), minor page faults so far) at the end of a step."""


def stamp() -> Stamp:
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pin_malloc() -> bool:
    """Make glibc keep freed memory in its heap instead of returning it to the OS
    (`kiln.process.keep_freed_memory`, which `kiln train` does for its own process).

    By default glibc unmaps or trims large freed blocks, so the next step page-faults its
    activations back in (thousands of faults per step here). How many depends on the heap's
    layout, which each contender's allocation order shapes differently: a few percent of step
    time that tracks allocator luck, not loop overhead. With the allocator pinned no contender
    faults in steady state. Returns False where this is not glibc.
    """
    return keep_freed_memory()


# ---- the shared model and data ---------------------------------------------------------------


def make_model(args: argparse.Namespace) -> GPT2LMHeadModel:
    """The reference GPT-2, sized by the flags. kiln passes use_cache=False itself; with the
    cache off in the config, raw and hf also skip building one, so only the loops differ."""
    return gpt2(args)


def copy_of(ref: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A contender's own model: a fresh module with the reference state_dict loaded."""
    model = GPT2LMHeadModel(copy.deepcopy(ref.config))
    model.load_state_dict(ref.state_dict())
    return model.train()


def make_batches(args: argparse.Namespace, n_steps: int) -> torch.Tensor:
    """(n_steps, B, T) random token ids from a fixed generator: packed, no padding."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (n_steps, args.batch_size, args.seq_len), generator=gen)


def kiln_blocks(batches: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, T) rows laid out so kiln's seeded cursor yields `batches[i]` at step i."""
    n_steps, bsz, seq = batches.shape
    rows = batches.reshape(-1, seq)  # (N, T) in step order
    perm = epoch_permutation(len(rows), seed, 0)
    blocks = torch.empty_like(rows)
    blocks[perm] = rows  # kiln gathers blocks[perm[i*B:(i+1)*B]] == rows[i*B:(i+1)*B]
    cursor = BatchCursor(len(rows), bsz, seed)
    for i in range(n_steps):
        if not torch.equal(blocks[cursor.next_indices()], batches[i]):
            raise RuntimeError(f"kiln would not see batch {i} at step {i}")
    return blocks


# ---- contenders ------------------------------------------------------------------------------


def decay_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """kiln's and hf's split for GPT-2: matrices decay; biases and LayerNorm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class RawLoop:
    """The minimal loop: what a step costs with no framework around it."""

    def __init__(self, model: GPT2LMHeadModel, batches: torch.Tensor) -> None:
        self.model, self.batches = model, batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            decay_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=True
        )
        self.first_loss: torch.Tensor | None = None

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        # A function, not the loop body: inline, `logits` (B, T, V) would stay alive into the
        # next step's forward, raising peak memory by 17 MB and making that step page-fault.
        logits = self.model(ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run_block(self, start: int, n: int) -> list[Stamp]:
        stamps = []
        for i in range(start, start + n):
            loss = self.step(self.batches[i])  # batches[i]: (B, T)
            # Keep no per-step loss tensors. Kept, they made this loop page-fault 16 MiB every
            # step (+8% time, 3 runs of 3): each few-byte storage likely lands in the hole a
            # freed (B, T-1, V) buffer left, so the hole never coalesces and the next step's
            # buffer comes from fresh heap.
            if self.first_loss is None:
                self.first_loss = loss
            stamps.append(stamp())
        return stamps


class _Sequences(torch.utils.data.Dataset):
    """hf's view of a block of batches: one `{"input_ids", "labels"}` example per row."""

    def __init__(self, batches: torch.Tensor) -> None:
        self.rows = batches.reshape(-1, batches.shape[-1])  # (n * B, T)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class _HFStamps(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stamps.append(stamp())


class HFLoop:
    """One long-lived `transformers.Trainer`; each block is one `train()` over that block's rows."""

    def __init__(self, model: GPT2LMHeadModel, batches: torch.Tensor, out: Path, seed: int) -> None:
        self.batches = batches
        self.timer = _HFStamps()
        hf_args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=batches.shape[1],
            num_train_epochs=1,  # one pass over the block's rows = one block of steps
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=EPS,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=CLIP,
            optim="adamw_torch_fused",
            train_sampling_strategy="sequential",  # the same batches in the same order
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=True,
            seed=seed,
        )
        self.trainer = HFTrainer(
            model=model,
            args=hf_args,
            train_dataset=_Sequences(batches[:1]),
            callbacks=[self.timer],
        )
        # disable_tqdm swaps the progress bar for a printer of the end-of-train() metrics.
        self.trainer.remove_callback(PrinterCallback)

    def run_block(self, start: int, n: int) -> list[Stamp]:
        self.timer.stamps = []
        self.trainer.train_dataset = _Sequences(self.batches[start : start + n])
        self.trainer.train()
        if len(self.timer.stamps) != n:
            raise RuntimeError(f"hf ran {len(self.timer.stamps)} steps, expected {n}")
        return self.timer.stamps


class KilnHost(Callback):
    """Stamps kiln's steps; at each block boundary runs the other contenders' blocks."""

    def __init__(self, boundaries: list[int], between: Callable[[int], None]) -> None:
        self.boundaries = boundaries
        self.between = between
        self.blocks: list[list[Stamp]] = [[]]

    def on_step_end(self, run: RunView) -> None:
        self.blocks[-1].append(stamp())
        block = len(self.blocks) - 1
        if run.state.step == self.boundaries[block]:
            self.between(block)
            if block + 1 < len(self.boundaries):
                self.blocks.append([])


def make_kiln_config(args: argparse.Namespace, out: Path, total_steps: int) -> kiln.RunConfig:
    return kiln_config(
        "step-overhead",
        args,
        out,
        optim={
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "betas": list(BETAS),
            "eps": EPS,
            "scheduler": "constant",
            "warmup_steps": 0,
        },
        train={
            "max_steps": total_steps,
            "batch_size": args.batch_size,
            "precision": "fp32",
            "grad_clip": CLIP,
        },
        log={"every_steps": 50},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    steps_per_block = [args.warmup] + [args.steps + 1] * args.rounds
    starts = [sum(steps_per_block[:i]) for i in range(len(steps_per_block))]
    total = sum(steps_per_block)
    batches = make_batches(args, total)
    ref = make_model(args)

    with tempfile.TemporaryDirectory(prefix="kiln-step-overhead-") as tmp:
        raw = RawLoop(copy_of(ref), batches)
        hf = HFLoop(copy_of(ref), batches, Path(tmp) / "hf", args.seed)
        stamps: dict[str, list[list[Stamp]]] = {"raw": [], "hf": []}

        def between(block: int) -> None:
            # Alternate who follows kiln, so no contender always inherits the same caches.
            order = ("raw", "hf") if block % 2 == 0 else ("hf", "raw")
            for name in order:
                loop = raw if name == "raw" else hf
                stamps[name].append(loop.run_block(starts[block], steps_per_block[block]))
            if torch.get_num_threads() != args.threads:
                raise RuntimeError(f"something changed torch threads to {torch.get_num_threads()}")
            print(f"  block {block}/{args.rounds} done", file=sys.stderr, flush=True)

        host = KilnHost([s + n for s, n in zip(starts, steps_per_block, strict=True)], between)
        trainer = Trainer(
            make_kiln_config(args, Path(tmp) / "kiln", total),
            model=copy_of(ref),
            tokenizer=train_bpe_tokenizer(["benchmark"], vocab_size=260),
            train_data=kiln_blocks(batches, args.seed),
            callbacks=[host],
        )
        result = trainer.fit()
        stamps["kiln"] = host.blocks

        models = {"raw": raw.model, "kiln": trainer.model, "hf": hf.trainer.model}
        first_loss = {"raw": float(raw.first_loss), "kiln": result.loss_history[0]}

    # Block 0 is the warmup; in each timed block the first stamp only opens the clock.
    times: dict[str, list[list[float]]] = {}
    faults: dict[str, list[int]] = {}
    for name in CONTENDERS:
        blocks = stamps[name]
        if len(blocks) != args.rounds + 1:
            raise RuntimeError(f"{name}: {len(blocks)} blocks, expected {args.rounds + 1}")
        pairs = [list(itertools.pairwise(blk)) for blk in blocks[1:]]
        times[name] = [[1e3 * (b[0] - a[0]) for a, b in blk] for blk in pairs]
        faults[name] = [b[1] - a[1] for blk in pairs for a, b in blk]
    return summarize(args, times, faults, models, first_loss)


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(
    args: argparse.Namespace,
    times: dict[str, list[list[float]]],
    faults: dict[str, list[int]],
    models: dict[str, torch.nn.Module],
    first_loss: dict[str, float],
) -> dict[str, Any]:
    stats: dict[str, dict[str, Any]] = {}
    for name in CONTENDERS:
        flat = [t for blk in times[name] for t in blk]
        stats[name] = {
            "median_ms": statistics.median(flat),
            "p10_ms": _pct(flat, 10),
            "p90_ms": _pct(flat, 90),
            "mean_ms": statistics.fmean(flat),
            "page_faults_per_step": statistics.median(faults[name]),
            "round_medians_ms": [statistics.median(blk) for blk in times[name]],
            "step_ms": times[name],
        }
    raw_median = stats["raw"]["median_ms"]
    for name in CONTENDERS:
        s = stats[name]
        s["ratio_to_raw"] = s["median_ms"] / raw_median
        s["overhead_ms"] = s["median_ms"] - raw_median
        # Paired per round: the same slice of machine time for both; the spread shows the noise.
        raw_rounds = stats["raw"]["round_medians_ms"]
        s["round_ratios"] = [m / r for m, r in zip(s["round_medians_ms"], raw_rounds, strict=True)]
    ref = dict(models["raw"].named_parameters())
    drift = {
        name: max((p - ref[n]).abs().max().item() for n, p in models[name].named_parameters())
        for name in ("kiln", "hf")
    }
    return {
        "config": {
            k: getattr(args, k)
            for k in (
                "rounds",
                "steps",
                "warmup",
                "threads",
                "batch_size",
                "seq_len",
                "vocab",
                "width",
                "layers",
                "heads",
                "seed",
                "pin_malloc",
            )
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kiln": kiln.__version__,
        },
        "results": stats,
        "kiln_over_raw": stats["kiln"]["ratio_to_raw"],
        "hf_over_raw": stats["hf"]["ratio_to_raw"],
        "sanity": {"first_loss": first_loss, "max_param_diff_vs_raw": drift},
    }


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"\nGPT-2 {cfg['layers']}x{cfg['width']}, vocab {cfg['vocab']}, batch "
        f"{cfg['batch_size']}x{cfg['seq_len']}, fp32, {cfg['threads']} threads; "
        f"{cfg['rounds']} rounds x {cfg['steps']} timed steps per contender\n"
    )
    head = f"{'contender':<10}{'median ms':>11}{'p10':>9}{'p90':>9}{'mean':>9}{'vs raw':>8}"
    print(f"{head}{'+ms':>8}{'faults/step':>13}")
    for name in CONTENDERS:
        s = report["results"][name]
        print(
            f"{name:<10}{s['median_ms']:>11.2f}{s['p10_ms']:>9.2f}{s['p90_ms']:>9.2f}"
            f"{s['mean_ms']:>9.2f}{s['ratio_to_raw']:>8.3f}{s['overhead_ms']:>+8.2f}"
            f"{s['page_faults_per_step']:>13.0f}"
        )
    print()
    for name in ("kiln", "hf"):
        rr = report["results"][name]["round_ratios"]
        print(
            f"{name}/raw = {report[f'{name}_over_raw']:.3f}   "
            f"(per-round {min(rr):.3f} .. {max(rr):.3f})"
        )
    sanity = report["sanity"]
    loss = ", ".join(f"{k} {v:.4f}" for k, v in sanity["first_loss"].items())
    drift = ", ".join(f"{k} {v:.1e}" for k, v in sanity["max_param_diff_vs_raw"].items())
    print(f"\nsanity: first-step loss {loss}; max |param - raw| at the end: {drift}")
    for name in CONTENDERS:
        faults = report["results"][name]["page_faults_per_step"]
        if faults:
            mib = faults * 4 / 1024  # 4 KiB pages
            print(
                f"warning: {name} page-faulted {faults:.0f} times a typical step (~{mib:.0f} MiB):"
                " its time includes the allocator's luck, not only its loop; rerun"
            )


# ---- whole processes ---------------------------------------------------------------------------


def raw_process(args: argparse.Namespace) -> None:
    """`--raw-process N`: the raw loop alone for N steps, as a process of its own."""
    torch.set_num_threads(args.threads)
    model = copy_of(make_model(args))
    loop = RawLoop(model, make_batches(args, args.raw_process))
    loop.run_block(0, args.raw_process)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a 1x32 GPT-2 on 2x16 tokens: steps of ~2 ms, so the gaps are the loops' own cost",
    )
    p.add_argument(
        "--quickstart",
        action="store_true",
        help="the quickstart's model and batch: GPT-2 4x128, vocab 2048, batch 16x256",
    )
    p.add_argument(
        "--no-pin-malloc",
        dest="pin_malloc",
        action="store_false",
        help="leave glibc's default trimming on (steps then page-fault; see pin_malloc)",
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="whole `kiln train configs/quickstart.yaml` processes against raw ones",
    )
    p.add_argument("--short", type=int, default=20, help="--processes: the short run's steps")
    p.add_argument("--long", type=int, default=120, help="--processes: the long run's steps")
    p.add_argument("--raw-process", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results (every step time) here")
    args = p.parse_args(argv)
    if args.processes:
        args.quickstart = True  # kiln trains the quickstart's model
    if args.processes and not 0 < args.short < args.long:
        p.error("need 0 < --short < --long")
    if args.tiny and args.quickstart:
        p.error("--tiny and --quickstart are two sizes: pick one")
    if args.tiny:
        args.layers, args.width, args.heads, args.vocab = 1, 32, 1, 512
        args.batch_size, args.seq_len = 2, 16
    if args.quickstart:  # configs/quickstart.yaml
        args.layers, args.width, args.heads, args.vocab = 4, 128, 4, 2048
        args.batch_size, args.seq_len = 16, 256
    if args.rounds < 1 or args.steps < 2 or args.warmup < 1 or args.threads < 1:
        p.error("need --rounds >= 1, --steps >= 2, --warmup >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # save_pretrained's shard bar at kiln's end
    logging.getLogger("kiln").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.pin_malloc and not pin_malloc():
        print("note: could not pin the allocator (not glibc); expect page-fault noise")
        args.pin_malloc = False
    if args.raw_process:
        raw_process(args)
        return
    if args.processes:
        report = processes(args, script=Path(__file__))
        print_processes(report)
    else:
        report = run(args)
        print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
