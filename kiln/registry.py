"""Plug-ins by name: one small registry type for metrics, collators, augmenters, data readers,
loggers and notifiers, and `require_extra` for optional dependencies.

    METRICS: Registry[Metric] = Registry("metric")

    @METRICS.register("length")
    def length(samples): ...

    METRICS.get("length")              # the registered object
    METRICS.get("mypkg.metrics:score") # or one imported by "module:attribute"
    METRICS.get("nope")                # KeyError: unknown metric 'nope' (known: bleu, length, ...)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Generic, TypeVar

from kiln.errors import KilnError

__all__ = [
    "MissingExtra",
    "Registry",
    "UnknownName",
    "lazy_exports",
    "missing_extra",
    "require_extra",
]

T = TypeVar("T")


class UnknownName(KeyError):
    """A name no plug-in is registered under (str() is the message, without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Named plug-ins of one kind (`kind` names it in errors: "metric", "collator", ...)."""

    def __init__(self, kind: str, *, reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.reserved = reserved
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator adding an object under `name` (a taken or reserved name is refused unless
        `replace`)."""

        def add(obj: T) -> T:
            self.add(name, obj, replace=replace)
            return obj

        return add

    def add(self, name: str, obj: T, *, replace: bool = False) -> None:
        """Add `obj` under `name` (see `register`)."""
        if name in self.reserved or (name in self._items and not replace):
            raise ValueError(f"a {self.kind} named {name!r} is already registered or reserved")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The object registered as `name`, or imported from "module:attribute".

        Raises:
            UnknownName (a KeyError): an unknown name (the message lists the known ones), or
                an import path that does not resolve (the message says why).
        """
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module_name), attr)
            # ValueError: an empty module name (":x"); TypeError: a relative one (".m:x").
            except (ImportError, AttributeError, ValueError, TypeError) as exc:
                raise UnknownName(f"cannot import {self.kind} {name!r}: {exc}") from None
        raise self._unknown(name)

    def __getitem__(self, name: str) -> T:
        """The object registered as `name` (no import path; see `get`)."""
        if name not in self._items:
            raise self._unknown(name)
        return self._items[name]

    def pop(self, name: str) -> T:
        """Remove the object registered as `name` and return it (e.g. a test's own plug-in).

        Raises:
            UnknownName (a KeyError): nothing is registered as `name`.
        """
        obj = self[name]
        del self._items[name]
        return obj

    def _unknown(self, name: str) -> UnknownName:
        known = ", ".join([*self.reserved, *self.names()])
        return UnknownName(f"unknown {self.kind} {name!r} (known: {known})")

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class MissingExtra(KilnError, ImportError):
    """An optional dependency is not installed; the message (one line, exit 2) names the pip
    extra."""


def require_extra(module: str, extra: str, *, feature: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingExtra` naming the extra that provides it:
    `pip install 'kiln[<extra>]'`. `feature` says what needed it (a config key, a command)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        need = f"{feature} needs" if feature else "needs"
        raise MissingExtra(
            f"{need} {module.split('.')[0]} ({exc}); install it with: pip install 'kiln[{extra}]'"
        ) from None


def missing_extra(module: str, extra: str, *, feature: str | None = None) -> str | None:
    """`require_extra`'s one line when `module` is not installed, found without importing it
    (`importlib.util.find_spec`: wandb or mlflow take seconds to import); None when it is."""
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except (ImportError, ValueError):  # a parent package missing, or a finder refusing it
        pass
    try:
        require_extra(module, extra, feature=feature)  # fails at once: nothing to import
    except MissingExtra as exc:
        return str(exc)
    return None


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports each name from its module on first use
    (`where`: name -> module), so importing a package loads none of them."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
