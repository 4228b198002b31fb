"""`DigestSet` (data.dedup in `kiln data prepare`): the same answers as a Python set of digests,
in a bounded table that spills to sorted runs on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.data.shards.dedup import DigestSet, digest_keys
from kiln.files import StorageFull


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    pool = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    pool[:40, 0] &= np.uint64(0xFF)  # shared low bits: long probe runs in a small table
    pool[40] = 0  # the all-zero digest (the table's free-slot marker) is a digest too
    # Many keys with the same first word: the block index and the merges must use both words.
    pool[50:1500, 0] = rng.integers(0, 3, size=1450).astype(np.uint64) << np.uint64(61)
    return pool


def _check_against_a_set(digests: DigestSet, pool: np.ndarray, seed: int) -> set[bytes]:
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    for _ in range(12):  # batches with repeats within them and across them
        batch = pool[rng.integers(0, len(pool), size=700)]
        expect = []
        for key in map(bytes, batch):
            expect.append(key not in seen)
            seen.add(key)
        assert digests.add(batch).tolist() == expect
        assert len(digests) == len(seen)
    return seen


def test_digest_set_keeps_what_a_python_set_keeps() -> None:
    digests = DigestSet(capacity=16)
    seen = _check_against_a_set(digests, _keys(np.random.default_rng(0), 3000), 1)
    assert digests.nbytes <= 64 * len(seen)
    assert digests.runs == 0
    keys = digest_keys([bytes(range(16)), bytes(16)])
    assert keys.shape == (2, 2)
    assert keys[1].tolist() == [0, 0]


@pytest.mark.parametrize("memory_keys", [1, 37, 500])
def test_spilled_digest_set_keeps_what_a_python_set_keeps(tmp_path: Path, memory_keys: int) -> None:
    spill = tmp_path / "runs"
    with DigestSet(capacity=16, spill=spill, memory_keys=memory_keys) as digests:
        seen = _check_against_a_set(digests, _keys(np.random.default_rng(3), 6000), 4)
        assert digests.runs >= 1
        # Binary-counter merges: at most log2(n / memory_keys) + 1 runs.
        assert digests.runs <= int(np.log2(len(seen) / memory_keys)) + 1
        files = sorted(spill.glob("run-*.bin"))
        assert len(files) == digests.runs
        # 16 bytes a digest on disk (the all-zero one and the table's aside).
        assert 16 * (len(seen) - memory_keys - 1) <= sum(f.stat().st_size for f in files)
        # Memory: the table (at most 2 * memory_keys slots, 16 B each) and the block index.
        assert digests.nbytes <= 16 * max(2 * memory_keys, 16) + len(seen) // 32 + 8 * digests.runs
    assert not spill.exists()  # close() removes the runs
    assert len(digests) == 0


def test_spilled_runs_are_sorted_and_distinct(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with DigestSet(spill=tmp_path / "runs", memory_keys=64) as digests:
        pool = _keys(rng, 4000)
        digests.add(pool)
        for path in sorted((tmp_path / "runs").glob("run-*.bin")):
            keys = np.fromfile(path, dtype=np.uint64).reshape(-1, 2)
            as_tuples = [tuple(k) for k in keys.tolist()]
            assert as_tuples == sorted(set(as_tuples))


def test_a_full_disk_while_spilling_is_storage_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import errno

    real_open = builtins.open

    def full_open(path: object, mode: str = "r", *args: object, **kw: object) -> object:
        if "w" in mode and str(path).endswith(".bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kw)  # type: ignore[call-overload]

    with DigestSet(spill=tmp_path / "runs", memory_keys=8) as digests:
        monkeypatch.setattr(builtins, "open", full_open)
        with pytest.raises(StorageFull, match="no space left on device while writing the dedup"):
            digests.add(_keys(np.random.default_rng(6), 2000))
