"""Generated damage to a valid export directory, checked by `kiln export --verify` in-process
(issue 26: the fuzz test covers damaged exports).

A seeded generator damages each file of one small export (tiny GPT-2, ONNX + TorchScript,
built once: tests/test_export_hostile.py's `bundle_for`) in each way that applies: cut in
half, cut to nothing, the last byte cut, a flipped bit, deleted, random bytes of the same
size, `{}`, `[]`, a value of the wrong type (JSON files), a directory in its place. Every case
ends without a traceback, with every stderr line a `kiln:` line, and

- exit 2 naming the damaged file, or
- exit 0 when the damage cannot matter (export_report.json, which --verify does not read, or
  a key of kiln_export.json it does not read, rewritten with a fresh checksum), and then the
  report is the undamaged export's, check for check.

A second pass damages an *unsealed* export (as written before kiln_export.json recorded its
files' checksums), where damage is found by loading and running: there exit 1 (a format
that runs but no longer matches) is an honest answer too.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_export_hostile import bundle_for

from kiln.cli import main

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

SEED = 26
UNSEALED_CASES = 10


def _wrong_type(value: Any) -> Any:
    """A JSON value of another type than `value`'s."""
    if isinstance(value, bool) or value is None:
        return "yes"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"a": 1}
    return [1]


def _retype(data: Any, rng: random.Random) -> tuple[Any, str]:
    """`data` with one value, at a random depth, of the wrong type; and its key path."""
    if not isinstance(data, dict | list) or not data or rng.random() < 0.3:
        return _wrong_type(data), ""
    key = rng.choice(list(data)) if isinstance(data, dict) else rng.randrange(len(data))
    inner, path = _retype(data[key], rng)
    data[key] = inner
    return data, f"{key}.{path}".rstrip(".")


def _damages(name: str, rng: random.Random) -> dict[str, Callable[[Path], str]]:
    """Each damage that applies to file `name`: a function of its path returning a note."""

    def cut(keep: Callable[[int], int]) -> Callable[[Path], str]:
        def apply(path: Path) -> str:
            data = path.read_bytes()
            path.write_bytes(data[: keep(len(data))])
            return f"cut to {keep(len(data))} bytes"

        return apply

    def flip(path: Path) -> str:
        data = bytearray(path.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        return f"bit flipped at {at}"

    def junk(path: Path) -> str:
        path.write_bytes(rng.randbytes(path.stat().st_size))
        return "random bytes"

    def delete(path: Path) -> str:
        path.unlink()
        return "deleted"

    def directory(path: Path) -> str:
        path.unlink()
        path.mkdir()
        return "a directory"

    damages = {
        "half": cut(lambda n: n // 2),
        "empty": cut(lambda n: 0),
        "last byte": cut(lambda n: n - 1),
        "bit flip": flip,
        "junk": junk,
        "deleted": delete,
        "directory": directory,
    }
    if name.endswith(".json"):

        def text(content: str) -> Callable[[Path], str]:
            def apply(path: Path) -> str:
                path.write_text(content)
                return content

            return apply

        def retype(path: Path) -> str:
            data, where = _retype(json.loads(path.read_text()), rng)
            path.write_text(json.dumps(data))
            return f"wrong type at {where or 'top level'}"

        damages.update({"{}": text("{}"), "[]": text("[]"), "wrong type": retype})
    return damages


def _verify(export: Path, capfd: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["export", "--verify", str(export), *extra])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert all(line.startswith("kiln:") for line in lines), lines
    return code, out


def _checks(out: str) -> Any:
    report = json.loads(out)
    report.pop("versions")
    assert report.pop("passed") is True
    return report


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle_for(tmp_path_factory)


@pytest.fixture(scope="module")
def clean(bundle: Path) -> Any:
    """The undamaged export's checks (what harmless damage must leave as they were)."""
    from kiln.export import verify_export

    report = json.loads(json.dumps(verify_export(bundle)))
    assert report.pop("passed") is True
    report.pop("versions")
    return report


def _cases(bundle: Path, seed: int) -> list[tuple[str, str, Callable[[Path], str]]]:
    """(file, damage, how) for every file and damage, but only three damages of the report:
    harmless, each runs the whole verify (a second), and one is as good as ten."""
    rng = random.Random(seed)
    names = sorted(p.name for p in bundle.iterdir())
    return [
        (name, kind, fn)
        for name in names
        for kind, fn in _damages(name, rng).items()
        if name != "export_report.json" or kind in ("junk", "deleted", "[]")
    ]


def _same_json(a: Path, b: Path) -> bool:
    """Whether two files hold the same JSON value (a cut trailing newline changes nothing)."""
    try:
        return json.loads(a.read_text()) == json.loads(b.read_text())
    except (OSError, ValueError):
        return False


def _reseal(export: Path) -> None:
    """kiln_export.json's checksum recomputed (as a tool that rewrites it consistently would)."""
    from kiln.export.meta import seal

    meta_file = export / "kiln_export.json"
    meta = json.loads(meta_file.read_text())
    if isinstance(meta, dict):  # a list or a string in its place has no checksum to fix
        meta.pop("meta_sha256", None)
        meta_file.write_text(json.dumps(seal(meta)))


def test_fuzz_damaged_exports_are_named_or_harmless(
    bundle: Path, clean: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    cases = _cases(bundle, SEED)
    # kiln_export.json retyped and resealed: the schema, not the checksum, must catch it.
    rng = random.Random(SEED + 1)
    cases += [
        ("kiln_export.json", f"wrong type, resealed #{i}", _damages("x.json", rng)["wrong type"])
        for i in range(8)
    ]
    outcomes: dict[str, int] = {}
    for i, (name, kind, damage) in enumerate(cases):
        export = Path(shutil.copytree(bundle, tmp_path / f"case{i}"))
        note = damage(export / name)
        if "resealed" in kind:
            _reseal(export)
        code, out = _verify(export, capfd, "--json")
        what = f"{name}: {kind} ({note})"
        if code == 0:  # harmless: then the checks are the clean export's, exactly
            unread = name == "export_report.json" or "resealed" in kind
            assert unread or _same_json(bundle / name, export / name), what
            assert _checks(out) == clean, what
        else:
            assert code == 2, what
        outcomes[what] = code
        shutil.rmtree(export)
    assert len(cases) >= 40
    named = sum(code == 2 for code in outcomes.values())
    print(f"{len(cases)} damaged exports: {named} exit 2, {len(cases) - named} harmless")


def test_fuzz_damaged_unsealed_exports_fail_in_one_line(
    bundle: Path, clean: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    rng = random.Random(SEED + 2)
    cases = rng.sample(
        [c for c in _cases(bundle, SEED + 3) if c[0] != "kiln_export.json"], UNSEALED_CASES
    )
    codes = []
    for i, (name, kind, damage) in enumerate(cases):
        export = Path(shutil.copytree(bundle, tmp_path / f"case{i}"))
        meta_file = export / "kiln_export.json"
        meta = json.loads(meta_file.read_text())
        meta.pop("files")
        meta.pop("meta_sha256")
        meta_file.write_text(json.dumps(meta))
        note = damage(export / name)
        code, out = _verify(export, capfd, "--json")
        what = f"{name}: {kind} ({note})"
        assert code in (0, 1, 2), f"{what}: exit {code}"
        if code == 0:
            assert _checks(out) == clean, what
        codes.append(code)
        shutil.rmtree(export)
    print(f"{len(cases)} unsealed: exit codes {sorted(codes)}")
