"""The generic plug-in registry (`kiln.registry.Registry`) and `require_extra`, and the
registries built on it (metrics, collators, augmenters, data readers)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from kiln.errors import KilnError
from kiln.registry import MissingExtra, Registry, UnknownName, require_extra

Widget = Callable[[], int]


def one() -> int:
    return 1


def _registry() -> Registry[Widget]:
    reg: Registry[Widget] = Registry("widget", reserved=("auto",))

    @reg.register("two")
    def two() -> int:
        return 2

    reg.add("one", one)
    return reg


def test_register_and_get_by_name() -> None:
    reg = _registry()
    assert reg.get("one") is one
    assert reg["one"] is one
    assert reg.get("two")() == 2
    assert reg.names() == ["one", "two"] == list(reg)
    assert "one" in reg
    assert "auto" not in reg
    assert len(reg) == 2
    assert reg.pop("one") is one
    assert reg.names() == ["two"]


def test_unknown_name_lists_the_known_ones() -> None:
    reg = _registry()
    with pytest.raises(UnknownName) as err:
        reg.get("three")
    assert isinstance(err.value, KeyError)
    # str() is the plain message (no KeyError quotes), reserved names first.
    assert str(err.value) == "unknown widget 'three' (known: auto, one, two)"
    with pytest.raises(UnknownName, match="unknown widget 'three'"):
        reg["three"]
    with pytest.raises(UnknownName, match="unknown widget 'three'"):
        reg.pop("three")


def test_get_imports_module_attribute() -> None:
    reg = _registry()
    assert reg.get("kiln.registry:require_extra") is require_extra
    with pytest.raises(UnknownName, match=r"cannot import widget 'kiln.registry:nope'"):
        reg.get("kiln.registry:nope")
    with pytest.raises(UnknownName, match=r"cannot import widget 'no_such_module_x:f'"):
        reg.get("no_such_module_x:f")
    for odd in (":f", ".relative:f"):  # not ValueError/TypeError from importlib
        with pytest.raises(UnknownName, match="cannot import widget"):
            reg.get(odd)


def test_duplicate_and_reserved_names_are_refused() -> None:
    reg = _registry()
    with pytest.raises(ValueError, match="a widget named 'one' is already registered"):
        reg.add("one", one)
    with pytest.raises(ValueError, match="'auto' is already registered or reserved"):
        reg.register("auto")(one)
    reg.add("one", int, replace=True)
    assert reg.get("one") is int


def test_require_extra_imports_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_extra("json", "none") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "kiln_missing_dep", None)  # `import` of it fails
    with pytest.raises(MissingExtra) as err:
        require_extra("kiln_missing_dep.sub", "extra", feature="x.y: the feature")
    assert isinstance(err.value, KilnError)
    assert isinstance(err.value, ImportError)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("x.y: the feature needs kiln_missing_dep (")
    assert message.endswith("install it with: pip install 'kiln[extra]'")
    with pytest.raises(MissingExtra, match=r"^needs kiln_missing_dep .*'kiln\[extra\]'$"):
        require_extra("kiln_missing_dep", "extra")


def test_kiln_registries_are_registries() -> None:
    from kiln.data.augment import AUGMENTERS
    from kiln.data.collate import COLLATORS
    from kiln.data.sources import READERS
    from kiln.metrics import METRICS

    assert {"bleu", "rouge", "recipe"} <= set(METRICS.names())
    assert {"causal", "instruction", "seq2seq"} <= set(COLLATORS.names())
    assert {"recipe_tip", "template_variation", "verb_paraphrase"} <= set(AUGMENTERS.names())
    assert {"jsonl", "json", "csv", "text", "parquet"} <= set(READERS.names())
    for reg in (METRICS, COLLATORS, AUGMENTERS, READERS):
        assert isinstance(reg, Registry)
    with pytest.raises(UnknownName, match=r"unknown data format 'xml' \(known: auto, hf, csv"):
        READERS.get("xml")
