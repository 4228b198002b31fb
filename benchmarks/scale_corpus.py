"""The corpora and tokenizer of `data_scale.py` (issue 28): seeded, generated once, cached.

A corpus of about N tokens is documents of lognormal word counts (median 300 words, 8 to 8000)
drawn from a Zipf-weighted word list (a recipe-like head and a long tail of made-up words), in
sentences and paragraphs, written streaming and in constant memory to several JSONL files
(`{"text": ...}`), the last one gzip-compressed (`ensure_corpus`). The same seed gives the same
documents, and the same bytes. The shared byte-level BPE (`ensure_tokenizer`) is trained with
kiln's `train_bpe_tokenizer` on the first documents of the same seeded stream, which are the
first documents of every corpus of that seed.

Imported by `data_scale.py` next to it.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "DocStream",
    "corpus_files",
    "ensure_corpus",
    "ensure_tokenizer",
    "kiln_files",
    "kiln_reads_gz",
    "parse_size",
    "size_label",
    "tokens_per_word",
]

GENERATOR_VERSION = 1
"""Bump when the generated text changes: cached corpora of another version are not reused."""
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
