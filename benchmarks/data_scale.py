"""Data at scale (issue 28): tokenizing a large corpus, kiln's path against bare `tokenizers`.

For each corpus size (`--tokens 10M,100M,1B`) the script generates (once, cached by size and
seed under `--corpus-dir`) a synthetic corpus: documents of lognormal word counts drawn from a
Zipf-weighted word list, in several JSONL files (`{"text": ...}`), the last one gzip-compressed.
One byte-level BPE (kiln's `train_bpe_tokenizer`, trained on the first documents of the same
seeded stream, which are the first documents of every corpus) is saved once as tokenizer.json
and used by every side. Then, side by side in one run, each in its own child process (so peak
RSS is that measurement's alone):

- bare:    stream the files, `Tokenizer.encode_batch(texts, add_special_tokens=False)` on
           batches of `--batch-docs` documents, ids taken out (the Rust tokenizer uses every
           core). The reference of the ratio.
- kiln:    what `kiln train` does to get its tokens in RAM: `kiln.data.assemble.assemble_data`
           (read every row, check, filter, dedup, split, render, tokenize, pack, write the
           tokenization cache) with a config pointing at the corpus and a tiny model. Skipped
           above `--kiln-max-tokens` (it keeps every token in RAM: the point of issue 28).
- prepare: `kiln data prepare` (`kiln.data.shards.prepare.prepare_shards`) on the same config:
           the files streamed through the same checks, filters and tokenizer into token
           shards on disk, in bounded memory (`.gz` read as it is), the tokenizing in
           `data.num_workers` worker processes (`--prepare-workers 0,2`: one side per value,
           `prepare-w0`, `prepare-w2`; default: prepare's own default).

Reported per size and side: wall seconds, CPU seconds (user + system of the child and its
workers over the same part: what the side costs on a busy machine), tokens/s (the corpus's
tokens as bare counts them, over wall time), peak RSS of the child (VmHWM), RSS before the
measured part (imports done), bytes of RSS per token ((peak - base) / tokens), and tokens/s
relative to bare. Medians over
`--rounds` (sides interleaved, order rotated each round). prepare's worker processes have
their own RSS: the largest worker's peak is in the note (forked workers share pages with the
child, so adding it to the child's peak overcounts).

    .venv/bin/python benchmarks/data_scale.py --tokens 10M
    .venv/bin/python benchmarks/data_scale.py --tokens 10M,100M --kiln-max-tokens 10M --json s.json

The 1B size is a manual run (about 4 GB of text, tens of minutes): never in CI.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The corpora and tokenizer live next to this file; `python benchmarks/data_scale.py` puts this
# folder on sys.path, an import by file path (tests/test_bench_data_scale.py) does not.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from scale_corpus import (  # noqa: E402
    corpus_files,
    ensure_corpus,
    ensure_tokenizer,
    kiln_files,
    kiln_reads_gz,
    parse_size,
    size_label,
    tokens_per_word,
)

SIDES = ("bare", "kiln", "prepare")


def _sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


# --- the measurements (each in a child process) -------------------------------------------------


def _rss_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 0


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that ended (prepare's
    worker processes)."""
    import resource

    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _iter_texts(files: list[str]) -> Iterator[str]:
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]


def child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Stream the files and `encode_batch` them in batches; nothing kept but counts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(spec["tokenizer"]) / "tokenizer.json"))
    base = _rss_kb("VmRSS")
    start, cpu = time.perf_counter(), _cpu_s()
    tokens = docs = 0
    encode = 0.0
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens, docs, encode
        t0 = time.perf_counter()
        encodings = tok.encode_batch(batch, add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encodings)
        encode += time.perf_counter() - t0
        docs += len(batch)
        batch.clear()

    for text in _iter_texts(spec["files"]):
        batch.append(text)
        if len(batch) >= spec["batch_docs"]:
            flush()
    if batch:
        flush()
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "encode_s": encode,
        "tokens": tokens,
        "docs": docs,
        "base_kb": base,
    }


def child_kiln(spec: dict[str, Any]) -> dict[str, Any]:
    """`assemble_data` on a config pointing at the corpus: what `kiln train` does before its
    first step to have every token in RAM (first run: the tokenization cache is written)."""
    import logging

    from kiln.data.assemble import Given, assemble_data

    logging.getLogger("kiln").setLevel(logging.WARNING)
    cfg = _config(spec)
    base = _rss_kb("VmRSS")
    start, cpu = time.perf_counter(), _cpu_s()
    data = assemble_data(cfg, Given())
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    val = 0 if data.val is None else data.val.num_tokens
    return {
        "wall": wall,
        "cpu": cpu,
        "base_kb": base,
        "kiln_target_tokens": data.train.num_tokens + val,
        "stats": data.stats,
    }


def _config(spec: dict[str, Any]) -> Any:
    """The config both kiln sides run: the corpus, the shared tokenizer, a tiny model."""
    from kiln.config import load_config

    work = Path(spec["work"])
    return load_config(
        data={
            "name": "data-scale",
            "output_dir": str(work / "run"),
            "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 1},
            "tokenizer": {"name_or_path": spec["tokenizer"]},
            "data": {"train": spec["files"], "cache_dir": str(work / "cache")},
            "train": {"max_steps": 1, "device": "cpu"},
        }
    )


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """`kiln data prepare` on `child_kiln`'s config: token shards written under the work dir."""
    import logging
    import resource

    import kiln.models  # noqa: F401  (imported by prepare_shards: imports stay out of the time)
    from kiln.data.shards.prepare import prepare_shards

    logging.getLogger("kiln").setLevel(logging.WARNING)
    cfg = _config(spec)
    base = _rss_kb("VmRSS")
    start, cpu = time.perf_counter(), _cpu_s()
    prepared = prepare_shards(cfg, workers=spec.get("workers"))
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "base_kb": base,
        "prepare_tokens": prepared.tokens,
        "shards": prepared.shards,
        "workers": prepared.workers,
        "worker_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "stats": prepared.stats,
    }


def _child_main(kind: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = {"bare": child_bare, "kiln": child_kiln, "prepare": child_prepare}[kind](spec)
    result["peak_kb"] = _rss_kb("VmHWM")
    print("RESULT " + json.dumps(result))
    return 0


def side_kind(side: str) -> tuple[str, int | None]:
    """(the child's kind, prepare's workers) of a side: `prepare-w2` -> ("prepare", 2)."""
    kind, _, workers = side.partition("-w")
    return kind, int(workers) if workers else None


def measure(kind: str, spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one measurement in a fresh child process; its result dict (or an `error`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, json.dumps(spec)]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s", "load": load}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}", "load": load}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["load"] = load
    return result


# --- one size, all sides ------------------------------------------------------------------------


def run_size(tokens: int, args: argparse.Namespace, tok_dir: Path, tpw: float) -> list[dict]:
    """Generate (or reuse) the corpus of this size and measure every side; the table rows."""
    label = size_label(tokens)
    corpus = ensure_corpus(args.corpus_dir, tokens, args.seed, args.files, tpw)
    files = [str(p) for p in corpus_files(corpus)]
    sides = list(args.sides)
    kiln_skip = None
    if "kiln" in sides and tokens > args.kiln_max_tokens:
        kiln_skip = (
            f"skipped: over --kiln-max-tokens {size_label(args.kiln_max_tokens)} (today's "
            "path keeps every token in RAM, issue 28)"
        )
        sides.remove("kiln")
        print(f"  kiln: {kiln_skip}")
    kiln_input = [str(p) for p in kiln_files(corpus)] if "kiln" in sides else []
    if "prepare" in sides and args.prepare_workers is not None:
        at = sides.index("prepare")
        sides[at : at + 1] = [f"prepare-w{n}" for n in args.prepare_workers]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)] if sides else []
        for side in order:
            with tempfile.TemporaryDirectory(dir=args.corpus_dir, prefix=".work-") as work:
                kind, workers = side_kind(side)
                spec = {
                    "tokenizer": str(tok_dir),
                    "files": kiln_input if side == "kiln" else files,
                    "batch_docs": args.batch_docs,
                    "work": work,
                    "workers": workers,
                }
                result = measure(kind, spec, args.timeout)
            runs[side].append(result)
            err = result.get("error")
            print(
                f"  {label} round {r + 1} {side}: "
                + (err or f"{result['wall']:.2f}s, peak {result['peak_kb'] / 1024:.0f} MB")
                + f" (load {result['load']:.2f})"
            )
    rows = _rows(label, tokens, runs, corpus)
    if kiln_skip is not None:
        rows.append(_row(label, "kiln", note=kiln_skip))
    return rows


def _row(size: str, side: str, **fields: Any) -> dict[str, Any]:
    keys = ("wall_s", "cpu_s", "tokens", "tokens_per_s", "peak_rss_mb", "base_rss_mb")
    keys += ("bytes_per_token",)
    return {"size": size, "side": side, **dict.fromkeys(keys), "ratio": None, **fields}


def _rows(label: str, tokens: int, runs: dict[str, list[dict]], corpus: Path) -> list[dict]:
    """Medians per side; tokens/s of every side over the corpus's tokens as bare counted them
    (the generator's target where bare did not run)."""
    good = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
    bare_tokens = [r["tokens"] for r in good.get("bare", [])]
    count = bare_tokens[0] if bare_tokens else tokens
    rows = []
    for side, results in good.items():
        if not results:
            rows.append(_row(label, side, note=runs[side][-1]["error"]))
            continue
        wall = statistics.median(r["wall"] for r in results)
        peak = statistics.median(r["peak_kb"] for r in results) * 1024
        base = statistics.median(r["base_kb"] for r in results) * 1024
        keep = ("encode_s", "kiln_target_tokens", "prepare_tokens", "shards", "workers", "stats")
        extra = {k: v for k, v in results[-1].items() if k in keep}
        if results[-1].get("workers"):
            worker_mb = statistics.median(r["worker_peak_kb"] for r in results) / 1024
            extra["note"] = f"{results[-1]['workers']} workers, largest peak {worker_mb:.0f} MB"
        rows.append(
            _row(
                label,
                side,
                wall_s=wall,
                cpu_s=statistics.median(r.get("cpu", 0.0) for r in results),
                tokens=count,
                tokens_per_s=count / wall,
                peak_rss_mb=peak / 2**20,
                base_rss_mb=base / 2**20,
                bytes_per_token=(peak - base) / count,
                loads=[r["load"] for r in runs[side]],
                rounds=len(results),
                corpus=corpus.name,
                **extra,
            )
        )
    bare = next((r for r in rows if r["side"] == "bare" and r["tokens_per_s"]), None)
    for row in rows:
        if bare and row["tokens_per_s"]:
            row["ratio"] = row["tokens_per_s"] / bare["tokens_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = "| size | side | wall s | CPU s | tokens | tokens/s | peak RSS MB | base RSS MB "
    lines = [head + "| B/token | ratio | note |", "|" + "---|" * 11]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['size']} | {r['side']} | {fmt(r['wall_s'], '.2f')} | {fmt(r['cpu_s'], '.1f')} "
            f"| {fmt(r['tokens'], ',')} "
            f"| {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_rss_mb'], '.0f')} "
            f"| {fmt(r['base_rss_mb'], '.0f')} | {fmt(r['bytes_per_token'], '.1f')} "
            f"| {fmt(r['ratio'], '.3f')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def marginal(rows: list[dict]) -> list[str]:
    """Per side measured at two or more sizes: the RSS each extra token costs between the
    smallest and the largest (peak difference over token difference: no fixed costs)."""
    lines = []
    for side in dict.fromkeys(r["side"] for r in rows):
        got = sorted(
            (r["tokens"], r["peak_rss_mb"]) for r in rows if r["side"] == side and r["wall_s"]
        )
        if len(got) >= 2 and got[-1][0] > got[0][0]:
            (t0, p0), (t1, p1) = got[0], got[-1]
            per = (p1 - p0) * 2**20 / (t1 - t0)
            lines.append(
                f"{side}: peak RSS grows {per:.1f} bytes per token "
                f"({size_label_any(t0)} -> {size_label_any(t1)} tokens: {p0:.0f} -> {p1:.0f} MB)"
            )
    return lines


def size_label_any(n: int) -> str:
    """A token count, rounded, for reading: 9876543 -> `9.88M`."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= unit:
            return f"{n / unit:.3g}{suffix}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return _child_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=_sizes, default=[10**7], help="sizes, e.g. 10M,100M,1B")
    parser.add_argument(
        "--sides",
        type=lambda s: [x.strip() for x in s.split(",")],
        default=list(SIDES),
        help="which sides to run (default bare,kiln,prepare)",
    )
    parser.add_argument(
        "--kiln-max-tokens", type=parse_size, default=10**8, help="skip kiln above (100M)"
    )
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kiln-data-scale",
        help="where corpora and the tokenizer are cached (default /tmp/kiln-data-scale)",
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus and tokenizer seed")
    parser.add_argument("--files", type=int, default=4, help="files per corpus (last: .gz)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--sample-docs", type=int, default=5000, help="tokenizer training docs")
    parser.add_argument("--batch-docs", type=int, default=1000, help="bare: docs per batch")
    parser.add_argument(
        "--prepare-workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="prepare: one side per worker count, e.g. 0,2 (default: prepare's default)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds per size (median)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="also write the rows and the setup here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sides) - set(SIDES))
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)} (choose from {', '.join(SIDES)})")
    args.corpus_dir.mkdir(parents=True, exist_ok=True)

    load_start = os.getloadavg()
    tok_dir = ensure_tokenizer(args.corpus_dir, args.seed, args.vocab, args.sample_docs)
    tpw = tokens_per_word(tok_dir, args.seed)
    gz = kiln_reads_gz()
    print(
        f"tokenizer {tok_dir.name}: {tpw:.3f} tokens/word; "
        + (
            "kiln reads .gz"
            if gz
            else "kiln reads no .gz today: it is given the .gz file decompressed (untimed)"
        )
    )
    rows: list[dict] = []
    for tokens in args.tokens:
        print(f"size {size_label(tokens)}:")
        rows.extend(run_size(tokens, args, tok_dir, tpw))
    load_end = os.getloadavg()
    import tokenizers
    import transformers

    setup = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, tokenizers {tokenizers.__version__}, "
        f"transformers {transformers.__version__}, rounds {args.rounds}, "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    )
    print()
    print(setup)
    print(table(rows))
    for line in marginal(rows):
        print(line)
    if args.json:
        info = {"setup": setup, "args": vars(args) | {"corpus_dir": str(args.corpus_dir)}}
        info |= {"kiln_reads_gz": gz, "tokens_per_word": tpw, "rows": rows}
        info["args"]["json"] = str(args.json)
        args.json.write_text(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
