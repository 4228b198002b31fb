"""Token shards (issue 28, first increment): the format, ShardWriter, ShardSet, shard_key.

The writer's resume must give byte-identical shards to an uninterrupted run (checked on the
manifest's sha256s and the bytes), after an exception mid-shard, a full disk, and a SIGKILL of a
real process (this file, run as a script, is that process).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.data.shards import (
    MANIFEST,
    ShardSet,
    ShardWriter,
    dtype_for,
    shard_key,
    source_identity,
)
from kiln.data.shards import writer as writer_module
from kiln.errors import KilnError
from kiln.files import LOCK_FILE, StorageFull

VOCAB = 1000
FP = "f" * 32


def _docs(n: int = 300, vocab: int = VOCAB, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` documents of 0..39 tokens (some empty) with a 0/1 mask each, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(0, 40))
        out.append((rng.integers(0, vocab, length), rng.integers(0, 2, length)))
    return out


def _write(directory: Path, docs, *, shard_tokens=100, vocab=VOCAB, masks=True, skip=0, **kw):
    """Write `docs[skip:]` (resuming when skip is None: skip what the shards hold)."""
    resume = skip is None
    with ShardWriter(
        directory,
        vocab,
        "key",
        FP,
        shard_tokens=shard_tokens,
        with_masks=masks,
        durable=False,
        resume=resume,
        **kw,
    ) as w:
        for tokens, mask in docs[w.documents_written if resume else skip :]:
            w.add(tokens, mask if masks else None)
        return w.close()


def _checksums(manifest: dict[str, Any]) -> list[str]:
    return [f["sha256"] for s in manifest["shards"] for f in s["files"].values()]


def _files(directory: Path) -> dict[str, bytes]:
    """The set's files and their bytes (the writers' lock file aside: it holds a pid)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != LOCK_FILE}


def _one_line(exc: pytest.ExceptionInfo[KilnError], path: Path) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


# ---- round trips -----------------------------------------------------------------------------


def test_roundtrip_uint16_documents_and_masks_exact(tmp_path: Path) -> None:
    docs = _docs()
    manifest = _write(tmp_path, docs)
    s = ShardSet.open(tmp_path, expect_key="key", expect_tokenizer=FP, verify="full")
    assert s.dtype == np.dtype("<u2")
    assert manifest["dtype"] == "uint16"
    assert len(s) == len(docs)
    assert s.num_tokens == sum(len(t) for t, _ in docs)
    assert sum(s.tokens_per_shard) == s.num_tokens
    assert s.num_shards > 1
    for i, (tokens, mask) in enumerate(docs):
        assert s.doc(i).tolist() == tokens.tolist()
        assert s.mask(i).tolist() == mask.tolist()
    assert s.doc(-1).tolist() == docs[-1][0].tolist()
    with pytest.raises(IndexError):
        s.doc(len(docs))
    # raw files: 2 bytes a token, 8 an offset, 1 a mask byte
    first = manifest["shards"][0]
    assert (tmp_path / "shard-00000.tokens").stat().st_size == 2 * first["tokens"]
    assert (tmp_path / "shard-00000.offsets").stat().st_size == 8 * (first["documents"] + 1)
    assert (tmp_path / "shard-00000.mask").stat().st_size == first["tokens"]
    assert not list(tmp_path.glob("*.done")), "markers are removed once the manifest is written"


def test_roundtrip_uint32_for_a_vocabulary_of_70000(tmp_path: Path) -> None:
    docs = _docs(50, vocab=70000)
    docs.append((np.array([65535, 65536, 69999]), np.array([1, 1, 0])))
    manifest = _write(tmp_path, docs, vocab=70000, masks=False)
    s = ShardSet.open(tmp_path)
    assert manifest["dtype"] == "uint32"
    assert s.dtype == np.dtype("<u4")
    assert [s.doc(i).tolist() for i in range(len(s))] == [t.tolist() for t, _ in docs]
    assert s.mask(0) is None
    assert dtype_for(65536) == np.dtype("<u2")
    assert dtype_for(65537) == np.dtype("<u4")


def test_format_is_readable_with_numpy_alone(tmp_path: Path) -> None:
    # What docs/data.md tells other tools: manifest, then raw little-endian files.
    docs = _docs(40)
    _write(tmp_path, docs, shard_tokens=50)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    got = []
    for shard in manifest["shards"]:
        tokens = np.fromfile(tmp_path / shard["files"]["tokens"]["name"], dtype="<u2")
        offsets = np.fromfile(tmp_path / shard["files"]["offsets"]["name"], dtype="<i8")
        got += [tokens[offsets[d] : offsets[d + 1]].tolist() for d in range(len(offsets) - 1)]
    assert got == [t.tolist() for t, _ in docs]


def test_the_reader_in_docs_data_md_reads_every_document(tmp_path: Path) -> None:
    # The numpy snippet of docs/data.md ("Token shards"), run as written.
    text = (Path(__file__).parent.parent / "docs" / "data.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/data.md", "exec"), namespace)
    docs = _docs(60)
    _write(tmp_path, docs, shard_tokens=70)
    for i, (tokens, mask) in enumerate(docs):
        got_tokens, got_mask = namespace["read_document"](tmp_path, i)
        assert got_tokens.tolist() == tokens.tolist()
        assert got_mask.tolist() == mask.tolist()


def test_empty_documents_and_an_empty_set(tmp_path: Path) -> None:
    docs = [(np.array([], dtype=np.int64), np.array([]))] * 5 + [(np.array([7]), np.array([1]))]
    _write(tmp_path / "a", docs, shard_tokens=2)
    s = ShardSet.open(tmp_path / "a", verify="full")
    assert len(s) == 6
    assert s.num_tokens == 1
    assert [s.doc(i).size for i in range(5)] == [0] * 5
    assert s.doc(5).tolist() == [7]
    # a shard holds at most shard_tokens documents, so empty ones cannot grow it unbounded
    assert max(s.documents_per_shard) <= 2
    _write(tmp_path / "b", [])
    empty = ShardSet.open(tmp_path / "b")
    assert len(empty) == 0
    assert empty.num_tokens == 0
    assert empty.num_shards == 0


def test_many_shards_respect_the_bound_and_a_long_document_gets_its_own(tmp_path: Path) -> None:
    docs = _docs(200)
    docs.insert(100, (np.arange(250) % VOCAB, np.ones(250)))  # longer than a shard
    manifest = _write(tmp_path, docs, shard_tokens=64)
    s = ShardSet.open(tmp_path)
    sizes = s.tokens_per_shard
    assert len(sizes) > 50
    assert sizes.count(250) == 1
    assert all(n <= 64 for n in sizes if n != 250)
    assert [s.doc(i).tolist() for i in range(len(s))] == [t.tolist() for t, _ in docs]
    shard, local = s.locate(100)
    assert manifest["shards"][shard]["tokens"] == 250
    assert local == 0


def test_the_writer_holds_one_shard_buffer_at_most(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=128, with_masks=True, durable=False)
    # tokens (uint16) + masks (uint8), allocated once; document ends (int64): at most 128
    bound = 128 * (2 + 1 + 8)
    peak = 0
    for tokens, mask in [*_docs(2000), *[([], [])] * 300]:  # empty ones fill the ends most
        w.add(tokens, mask)
        peak = max(peak, w.buffered_tokens)
        assert w.buffer_nbytes <= bound
    assert w.buffer_nbytes == bound
    assert peak <= 128
    with pytest.raises(ValueError, match="integers"):
        w.add([1.5, 2.0])
    with pytest.raises(ValueError, match="out of range"):
        w.add([VOCAB])
    assert len(w.shards) > 100
    w.close()


# ---- resume ----------------------------------------------------------------------------------


def test_resume_after_an_error_mid_shard_writes_identical_shards(tmp_path, monkeypatch) -> None:
    docs = _docs()
    whole = _write(tmp_path / "whole", docs)
    real = writer_module.write_chunk

    def fail_on_shard_3_offsets(file: Any, path: Path, data: Any) -> None:
        if path.name == "shard-00003.offsets":
            raise RuntimeError("killed")
        real(file, path, data)

    monkeypatch.setattr(writer_module, "write_chunk", fail_on_shard_3_offsets)
    with pytest.raises(RuntimeError, match="killed"):
        _write(tmp_path / "cut", docs)
    cut = tmp_path / "cut"
    assert (cut / "shard-00002.done").exists()
    assert not (cut / "shard-00003.tokens").exists()  # streamed to a temporary name, removed
    assert not list(cut.glob(".shard-*"))
    assert not (cut / MANIFEST).exists()
    with pytest.raises(KilnError, match="incomplete"):
        ShardSet.open(cut)
    monkeypatch.setattr(writer_module, "write_chunk", real)
    resumed = ShardWriter.resume(cut, VOCAB, "key", FP, shard_tokens=100, with_masks=True)
    assert len(resumed.shards) == 3
    assert resumed.documents_written == sum(s["documents"] for s in whole["shards"][:3])
    resumed.stop()
    # a marked shard whose file was cut short is written again, with those after it
    tokens = cut / "shard-00001.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-1])
    resumed = ShardWriter.resume(cut, VOCAB, "key", FP, shard_tokens=100, with_masks=True)
    assert len(resumed.shards) == 1
    assert not (cut / "shard-00002.done").exists()
    resumed.stop()
    assert _checksums(_write(cut, docs, skip=None)) == _checksums(whole)
    assert _files(cut) == _files(tmp_path / "whole")


def test_resume_after_disk_full_writes_identical_shards(tmp_path, monkeypatch) -> None:
    docs = _docs()
    whole = _write(tmp_path / "whole", docs)
    real = writer_module.write_chunk

    def full_on_shard_2(file: Any, path: Path, data: Any) -> None:
        if path.name.startswith("shard-00002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, path, data)

    monkeypatch.setattr(writer_module, "write_chunk", full_on_shard_2)
    with pytest.raises(StorageFull) as exc:
        _write(tmp_path / "cut", docs)
    assert "no space left on device while writing the token shard" in exc.value.message()
    assert "shard-00002.tokens" in exc.value.message()
    assert not (tmp_path / "cut" / MANIFEST).exists()
    assert not list((tmp_path / "cut").glob(".shard-*"))  # no temporary file left to fill it
    monkeypatch.setattr(writer_module, "write_chunk", real)
    assert _checksums(_write(tmp_path / "cut", docs, skip=None)) == _checksums(whole)


def _child(directory: str) -> None:
    """Write `_docs()` and stop, forever, when shard 3's tokens are streamed to their
    temporary file (not renamed into place: that comes after its offsets)."""
    real = writer_module.write_chunk

    def stop_at_offsets_of_shard_3(file: Any, path: Path, data: Any) -> None:
        if path.name == "shard-00003.offsets":
            file.flush()
            print("ready", flush=True)
            sys.stdin.read()  # blocks until the parent kills this process
        real(file, path, data)

    writer_module.write_chunk = stop_at_offsets_of_shard_3
    w = ShardWriter(directory, VOCAB, "key", FP, shard_tokens=100, with_masks=True)
    for tokens, mask in _docs():
        w.add(tokens, mask)
    w.close()


@pytest.mark.slow
def test_resume_after_sigkill_of_a_writer_process_writes_identical_shards(tmp_path) -> None:
    docs = _docs()
    whole = _write(tmp_path / "whole", docs)
    cut = tmp_path / "cut"
    child = subprocess.Popen(
        [sys.executable, __file__, "child", str(cut)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    left = sorted(p.name.split(".tmp-")[0] for p in cut.glob(".shard-*"))  # streamed, unnamed
    assert left == [".shard-00003.mask", ".shard-00003.offsets", ".shard-00003.tokens"]
    assert not (cut / "shard-00003.done").exists()
    assert not (cut / MANIFEST).exists()
    assert _checksums(_write(cut, docs, skip=None)) == _checksums(whole)
    assert _files(cut) == _files(tmp_path / "whole")


def test_resume_with_other_settings_names_the_shard_marker(tmp_path, monkeypatch) -> None:
    real = writer_module.write_chunk

    def stop_at_shard_2(file: Any, path: Path, data: Any) -> None:
        if path.name.startswith("shard-00002"):
            raise RuntimeError("killed")
        real(file, path, data)

    monkeypatch.setattr(writer_module, "write_chunk", stop_at_shard_2)
    with pytest.raises(RuntimeError):
        _write(tmp_path, _docs())
    monkeypatch.setattr(writer_module, "write_chunk", real)
    with pytest.raises(KilnError) as exc:
        ShardWriter.resume(tmp_path, VOCAB, "key", FP, shard_tokens=50, with_masks=True)
    assert "shard_tokens: 100 then 50" in _one_line(exc, tmp_path / "shard-00000.done")
    # a fresh writer starts over: the old shards are removed, nothing else is
    (tmp_path / "notes.txt").write_text("mine")
    fresh = ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=50)
    assert fresh.documents_written == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "notes.txt"]
    # and while it writes, a second writer of the set is refused, naming it
    with pytest.raises(KilnError) as exc:
        ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=50)
    assert f"pid {os.getpid()}" in _one_line(exc, tmp_path)
    fresh.stop()
    ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=50).stop()


def test_a_complete_set_is_not_written_over(tmp_path: Path) -> None:
    _write(tmp_path, _docs(10))
    with pytest.raises(KilnError) as exc:
        ShardWriter(tmp_path, VOCAB, "key", FP)
    assert "already complete" in _one_line(exc, tmp_path / MANIFEST)


# ---- bad input: one line naming the file -----------------------------------------------------


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    _write(tmp_path, _docs(100), shard_tokens=200)
    return tmp_path


def test_missing_or_invalid_manifest_is_one_line(shard_set: Path) -> None:
    manifest = shard_set / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[:-20])
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "not a valid shard manifest" in _one_line(exc, manifest)
    data = json.loads(text)
    data["shards"][0]["tokens"] = "many"
    manifest.write_text(json.dumps(data))
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "'tokens'" in _one_line(exc, manifest)
    data = json.loads(text)
    data["shards"][0]["files"]["tokens"]["name"] = "../../etc/passwd"
    manifest.write_text(json.dumps(data))
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "not plain" in _one_line(exc, manifest)
    manifest.unlink()
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "incomplete" in _one_line(exc, manifest)


def test_a_manifest_whose_sizes_disagree_with_its_counts_is_one_line(shard_set: Path) -> None:
    manifest = shard_set / MANIFEST
    data = json.loads(manifest.read_text())
    data["shards"][0]["documents"] -= 1
    data["documents"] -= 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "shard-00000.offsets of" in _one_line(exc, manifest)


def test_truncated_or_missing_shard_file_is_one_line(shard_set: Path) -> None:
    tokens = shard_set / "shard-00001.tokens"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "truncated" in _one_line(exc, tokens)
    tokens.unlink()
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set)
    assert "missing" in _one_line(exc, tokens)


def test_altered_shard_is_caught_by_full_verification(shard_set: Path) -> None:
    mask = shard_set / "shard-00002.mask"
    data = bytearray(mask.read_bytes())
    data[0] ^= 1
    mask.write_bytes(bytes(data))
    assert len(ShardSet.open(shard_set)) == 100  # same size: "size" cannot tell
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set, verify="full")
    assert "sha256" in _one_line(exc, mask)


def test_altered_offsets_are_caught_on_first_read(shard_set: Path) -> None:
    offsets = shard_set / "shard-00000.offsets"
    values = np.fromfile(offsets, dtype="<i8")
    values[-1] += 5
    values.tofile(offsets)
    s = ShardSet.open(shard_set)
    with pytest.raises(KilnError) as exc:
        s.doc(0)
    assert "offsets" in _one_line(exc, offsets)


def test_another_tokenizer_or_key_is_one_line(shard_set: Path) -> None:
    manifest = shard_set / MANIFEST
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set, expect_tokenizer="0" * 32)
    assert "another tokenizer" in _one_line(exc, manifest)
    with pytest.raises(KilnError) as exc:
        ShardSet.open(shard_set, expect_key="other")
    assert "other sources or settings" in _one_line(exc, manifest)


def test_a_tokenizer_is_checked_by_the_tokenization_cache_fingerprint(tmp_path: Path) -> None:
    from helpers import bpe_tokenizer

    from kiln.data.cache import tokenizer_fingerprint

    tokenizer = bpe_tokenizer(["lemon rice with salt", "a tomato soup"] * 20)
    fingerprint = tokenizer_fingerprint(tokenizer)
    w = ShardWriter(tmp_path, len(tokenizer), "key", fingerprint, durable=False)
    w.add(tokenizer("lemon rice")["input_ids"])
    w.close()
    assert ShardSet.open(tmp_path, expect_tokenizer=tokenizer).tokenizer_fingerprint == fingerprint
    other = bpe_tokenizer(["something else entirely"] * 20)
    with pytest.raises(KilnError) as exc:
        ShardSet.open(tmp_path, expect_tokenizer=other)
    assert "another tokenizer" in _one_line(exc, tmp_path / MANIFEST)


# ---- opening is O(shards) --------------------------------------------------------------------


def test_opening_1000_shards_reads_no_token_bytes(tmp_path: Path, monkeypatch) -> None:
    w = ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=4, durable=False)
    for i in range(1000):
        w.add([i % VOCAB] * 4)
    w.close()
    opened: list[str] = []
    real_open, real_memmap = builtins.open, np.memmap

    def spy_open(file: Any, *args: Any, **kw: Any) -> Any:
        opened.append(os.fspath(file) if not isinstance(file, int) else "<fd>")
        return real_open(file, *args, **kw)

    def spy_memmap(path: Any, *args: Any, **kw: Any) -> Any:
        opened.append(f"memmap:{os.fspath(path)}")
        return real_memmap(path, *args, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(np, "memmap", spy_memmap)
    s = ShardSet.open(tmp_path)
    assert s.num_shards == 1000
    assert len(s) == 1000
    assert not [f for f in opened if not f.endswith(MANIFEST)], opened[:5]
    assert s.doc(777).tolist() == [777] * 4
    # one document maps only its own shard's files
    assert sorted(Path(f).name for f in opened if f.startswith("memmap:")) == [
        "shard-00777.offsets",
        "shard-00777.tokens",
    ]


def test_at_most_max_open_shards_stay_mapped(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, VOCAB, "key", FP, shard_tokens=4, durable=False)
    for i in range(300):
        w.add([i % VOCAB] * 4)
    w.close()
    s = ShardSet.open(tmp_path, max_open_shards=8)
    fds = len(os.listdir("/proc/self/fd"))
    first = s.doc(0)
    assert [s.doc(i).tolist() for i in range(300)] == [[i] * 4 for i in range(300)]
    # each mapped shard holds a descriptor per file (2 here): 8 shards, not 300, and the token
    # map of shard 0 that `first` keeps alive
    assert len(os.listdir("/proc/self/fd")) - fds <= 2 * 8 + 1
    assert first.tolist() == [0] * 4, "a view of an evicted shard stays valid"


# ---- the content key -------------------------------------------------------------------------


def test_shard_key_changes_with_each_input(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "x"}\n')
    ident = source_identity(src)
    assert ident == {
        "path": str(src.resolve()),
        "size": src.stat().st_size,
        "mtime_ns": src.stat().st_mtime_ns,
    }
    base = shard_key([ident], {"min_chars": 1}, FP, 1)
    assert base == shard_key([dict(ident)], {"min_chars": 1}, FP, 1)
    assert len(base) == 40
    others = {
        shard_key([ident], {"min_chars": 2}, FP, 1),
        shard_key([ident], {"min_chars": 1}, "0" * 32, 1),
        shard_key([ident], {"min_chars": 1}, FP, 2),
        shard_key([ident, ident], {"min_chars": 1}, FP, 1),
    }
    assert base not in others
    assert len(others) == 4
    os.utime(src, ns=(ident["mtime_ns"] + 10**9, ident["mtime_ns"] + 10**9))
    assert shard_key([source_identity(src)], {"min_chars": 1}, FP, 1) != base
    # by content: a copy elsewhere with another mtime hashes the same bytes
    copy = tmp_path / "b.jsonl"
    copy.write_bytes(src.read_bytes())
    by_content = source_identity(src, content=True)
    assert by_content["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source_identity(copy, content=True)["sha256"] == by_content["sha256"]
    with pytest.raises(KilnError) as exc:
        source_identity(tmp_path / "gone.jsonl")
    _one_line(exc, tmp_path / "gone.jsonl")


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2])
