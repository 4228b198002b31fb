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
import functools
import gzip
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

GENERATOR_VERSION = 1
"""Bump when the generated text changes: cached corpora of another version are not reused."""
SIDES = ("bare", "kiln", "prepare")
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
_BASE_TEXT = (
    "the a and of to in with for on until then add stir cook bake simmer boil mix whisk chop "
    "slice dice mince fold pour serve season salt pepper oil butter garlic onion lemon rice "
    "flour sugar egg eggs milk cream cheese tomato tomatoes basil thyme oregano cumin chicken "
    "beef pork fish beans lentils water stock broth pan pot oven heat medium low high minutes "
    "hours until golden tender soft crisp smooth bowl spoon cup cups tablespoon teaspoon large "
    "small fresh dried chopped sliced minced ground warm hot cold it is this that into over "
    "from at by or as be are was were will can should about each all some more most very well"
)
_BASE_WORDS = _BASE_TEXT.split()
_SYLLABLE_TEXT = (
    "ka lo mi ne ru ta si po fe la do ri mu ve ko sa ni te bo gu ar en il or us an el in on "
    "str tr pl gr br cl sh ch th qu"
)
_SYLLABLES = _SYLLABLE_TEXT.split()


# --- sizes --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """A token count written with an optional suffix: `20k`, `10M`, `1B` (or `1G`), `5000`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20k, 10M, 1B)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1: {text!r}")
    return int(value)


def size_label(n: int) -> str:
    """The short name of a token count: 10000000 -> `10M`, 20000 -> `20k`."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


# --- the synthetic text -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _vocabulary(seed: int, tail_words: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The words of a seed's stream, their Zipf CDF, and the generator's state after drawing
    them (cached: drawing 30k made-up words takes ~1 s)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION])
    tail = {
        "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 5)))) for _ in range(tail_words)
    }
    words = np.array(list(_BASE_WORDS) + sorted(tail - set(_BASE_WORDS)), dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 2.7) ** 1.07
    return words, np.cumsum(weights / weights.sum()), rng.bit_generator.state


class DocStream:
    """A seeded, endless stream of documents: lognormal word counts (median `median_words`),
    words from a Zipf-weighted list (a recipe-like head and a long tail of made-up words),
    sentences of 4-24 words, paragraphs of a few sentences. The same seed gives the same
    documents in the same order; memory does not grow with the number drawn."""

    def __init__(self, seed: int, median_words: int = 300, tail_words: int = 30_000) -> None:
        words, self._cdf, state = _vocabulary(seed, tail_words)
        self.words = words
        self._mu = math.log(median_words)
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state  # where drawing the vocabulary left the stream

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        rng = self._rng
        n = int(min(8000, max(8, rng.lognormal(self._mu, 0.9))))
        picks = np.minimum(np.searchsorted(self._cdf, rng.random(n)), len(self.words) - 1)
        words = self.words[picks].tolist()
        # sentence ends every 4-24 words; every ~5th sentence closes a paragraph
        ends = np.cumsum(rng.integers(4, 25, size=n // 4 + 1))
        for k, end in enumerate(ends[ends < n].tolist()):
            words[end - 1] += ".\n\n" if k % 5 == 4 else "."
        words[0] = words[0].capitalize()
        return " ".join(words) + "."


def doc_words(text: str) -> int:
    return text.count(" ") + 1


def ensure_tokenizer(root: Path, seed: int, vocab: int, sample_docs: int) -> Path:
    """The shared tokenizer (a directory with tokenizer.json), trained once per (seed, vocab)
    on the first `sample_docs` documents of the stream with kiln's `train_bpe_tokenizer`."""
    path = root / f"tokenizer-s{seed}-v{vocab}-n{sample_docs}-g{GENERATOR_VERSION}"
    if (path / "tokenizer.json").is_file():
        return path
    from kiln.models.tokenizer import train_bpe_tokenizer

    start = time.perf_counter()
    stream = DocStream(seed)
    tokenizer = train_bpe_tokenizer((next(stream) for _ in range(sample_docs)), vocab)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tok-"))
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    print(f"tokenizer: trained on {sample_docs} documents in {time.perf_counter() - start:.1f}s")
    return path


def tokens_per_word(tokenizer_dir: Path, seed: int, docs: int = 2000) -> float:
    """Tokens per word of the stream under the shared tokenizer (sizes the word budget)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    stream = DocStream(seed)
    texts = [next(stream) for _ in range(docs)]
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens / sum(doc_words(t) for t in texts)


def ensure_corpus(root: Path, tokens: int, seed: int, files: int, tpw: float) -> Path:
    """The corpus of about `tokens` tokens for `seed`: generated once (streaming, constant
    memory) into `<root>/corpus-<size>-s<seed>-g<version>/`, reused while its manifest exists.

    `files` files share the word budget; the last is `.jsonl.gz` (gzip level 1)."""
    path = root / f"corpus-{size_label(tokens)}-s{seed}-f{files}-g{GENERATOR_VERSION}"
    if (path / "manifest.json").is_file():
        return path
    start = time.perf_counter()
    budget = tokens / tpw  # words
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".corpus-"))
    stream = DocStream(seed)
    info: dict[str, Any] = {"tokens_target": tokens, "seed": seed, "files": [], "docs": 0}
    written = 0.0
    for i in range(files):
        name = f"part-{i:04d}.jsonl" + (".gz" if i == files - 1 and files > 1 else "")
        docs = words = 0
        with _open_out(tmp / name) as f:
            while docs == 0 or written < budget * (i + 1) / files:  # no empty file
                text = next(stream)
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n = doc_words(text)
                written += n
                words += n
                docs += 1
        info["files"].append({"name": name, "docs": docs, "words": words})
        info["docs"] += docs
    info["words"] = int(written)
    info["bytes_on_disk"] = sum((tmp / f["name"]).stat().st_size for f in info["files"])
    info["seconds"] = round(time.perf_counter() - start, 2)
    (tmp / "manifest.json").write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)
    print(
        f"corpus {size_label(tokens)}: {info['docs']:,} documents, {info['words']:,} words, "
        f"{info['bytes_on_disk'] / 1e6:.0f} MB on disk, generated in {info['seconds']:.1f}s"
    )
    return path


def _open_out(path: Path) -> IO[str]:
    """A text file to write; `.gz`: gzip level 1 with no name or time in the header, so the
    same seed gives the same bytes."""
    if path.suffix != ".gz":
        return path.open("w", encoding="utf-8")
    raw = path.open("wb")
    packed = gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0)
    packed.myfileobj = raw  # closed with it
    return io.TextIOWrapper(packed, encoding="utf-8")


def corpus_files(corpus: Path) -> list[Path]:
    manifest = json.loads((corpus / "manifest.json").read_text())
    return [corpus / f["name"] for f in manifest["files"]]


def kiln_reads_gz() -> bool:
    """Whether kiln's readers take a `.jsonl.gz` file today (probed on a two-row file)."""
    from kiln.data.sources import read_rows
    from kiln.errors import KilnError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.write('{"text": "a"}\n{"text": "b"}\n')
        try:
            return [r["text"] for r in read_rows(str(path))] == ["a", "b"]
        except (KilnError, ValueError, KeyError, OSError):
            return False


def kiln_files(corpus: Path) -> list[Path]:
    """The corpus files as kiln is given them: a `.gz` file decompressed (once, cached next to
    the corpus, untimed) when kiln cannot read gzip, so both sides see the same text."""
    files = corpus_files(corpus)
    if kiln_reads_gz():
        return files
    out = []
    for path in files:
        if path.suffix == ".gz":
            plain = corpus / "plain" / path.stem
            if not plain.is_file():
                plain.parent.mkdir(exist_ok=True)
                tmp = plain.with_suffix(".tmp")
                with gzip.open(path, "rb") as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, plain)
            path = plain
        out.append(path)
    return out


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
