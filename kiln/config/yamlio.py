"""YAML reading for configs: a safe loader with bounds, and the parse of override values.

The loader reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and refuses what no config needs:
documents over 16 MiB, nested deeper than 64 levels, expanded by aliases past 100,000 values,
or with non-scalar keys. Every refusal is a one-line `ConfigError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from kiln.config.base import ConfigError, short_repr

__all__ = ["parse_override_value", "read_yaml_file", "read_yaml_text"]


_MAX_BYTES = 16 << 20  # of a config file; a real one is a few KiB
_MAX_DEPTH = 64  # nesting of mappings and lists; a real config uses under 10
_MAX_VALUES = 100_000  # values once aliases are expanded: stops "billion laughs" files


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and refuses documents
    that are too deep, too large once aliases are expanded, or that hold non-scalar keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # The composer recurses once per level: `[[[[...` would end in a RecursionError.
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {_MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expanded(node)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # int() refuses over 4300 digits and date() refuses 2024-02-30, with a bare ValueError.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            kind = node.tag.rpartition(":")[2]
            reason = str(exc).split(";")[0]
            problem = f"cannot read {short_repr(node.value)} as {kind}: {reason}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                problem = "a key must be a string, not a list or a mapping"
                raise ConstructorError(None, None, problem, key.start_mark)
        return super().construct_mapping(node, deep)


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a document that aliases expand past _MAX_VALUES values or _MAX_DEPTH levels, or
    into a cycle: loading shares an aliased value, but validation and dumps walk every copy."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded
    open_: set[int] = set()

    def walk(node: yaml.Node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in open_:
            raise ComposerError(
                None, None, "an alias refers to a value that holds it", node.start_mark
            )
        if key not in done:
            # Anchors come before their aliases, so a first visit is at the literal position
            # and this recursion is no deeper than the (already bounded) document.
            open_.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            values, levels = 1, 1
            for child in children:
                n, d = walk(child, level + 1)
                values, levels = values + n, max(levels, d + 1)
                if values > _MAX_VALUES:
                    problem = f"aliases expand it to more than {_MAX_VALUES} values"
                    raise ComposerError(None, None, problem, node.start_mark)
            open_.discard(key)
            done[key] = (values, levels)
        values, levels = done[key]
        if level + levels > _MAX_DEPTH + 1:
            problem = f"aliases nest it deeper than {_MAX_DEPTH} levels"
            raise ComposerError(None, None, problem, node.start_mark)
        return values, levels

    if root is not None:
        walk(root, 1)


_FLOAT_RE = r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(_FLOAT_RE, re.X), list("-+0123456789.")
)


def parse_override_value(text: str) -> Any:
    """Parse the value of a `key=value` override: numbers, bools, null, [lists], or a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def read_yaml_file(path: Path) -> dict[str, Any]:
    """The mapping a config file holds (empty for an empty file), or a one-line ConfigError."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read config: {exc.strerror or exc}"], str(path)) from None
    if len(data) > _MAX_BYTES:
        raise ConfigError([f"larger than {_MAX_BYTES >> 20} MiB, not a config"], str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise ConfigError([f"not UTF-8 text ({bad}); save it as UTF-8"], str(path)) from None
    return read_yaml_text(text, str(path))


def read_yaml_text(text: str, source: str | None = None) -> dict[str, Any]:
    """The mapping YAML `text` holds (empty for empty text); errors name `source`:line."""
    if len(text) > _MAX_BYTES:
        raise ConfigError([f"larger than {_MAX_BYTES >> 20} MiB, not a config"], source)
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source or 'line'}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"invalid YAML: {problem}"], where) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source)
    return raw
