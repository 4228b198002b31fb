"""The package structure: which layer may import which, no import cycles, no private names
reached across packages, and what a light import really loads.

The static rules read every module under kiln/ with `ast` (nothing is imported). An import is

    typing    inside `if TYPE_CHECKING:`: never runs, so it is free;
    deferred  inside a function: runs when the function is called;
    module    anywhere else (module level, class bodies, try blocks): runs at import.

"Runtime" means deferred or module. The layers follow the flow of data (DESIGN.md), each
importing only from those below it:

    callbacks, job, commands, cli      drive the engine
    engine                             the loop
    data, models, optim                built from a config
    config | the low helpers           files, registry, runs, rank, device, process
    errors
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kiln"


# ---- reading the package ---------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One edge: `source` imports `target` (a kiln module) at `line`."""

    source: str
    target: str
    line: int
    kind: str
    """"module", "deferred" or "typing" (see the module docstring)."""
    name: str | None = None
    """For `from target import name` where name is not a module: the name taken."""

    @property
    def runtime(self) -> bool:
        return self.kind != "typing"

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.source}:{self.line} imports {what} ({self.kind})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, p in FILES.items() if p.name == "__init__.py"}


def _lazy_table(path: Path) -> dict[str, str]:
    """A package's `_LAZY = {name: module}`: `from kiln import Trainer` imports the module."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    return {}


LAZY = {name: _lazy_table(FILES[name]) for name in PACKAGES}


def directory_of(module: str) -> str:
    """The package (directory) a module lives in: itself for a package's __init__."""
    return module if module in PACKAGES else module.rpartition(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve_from(source: str, node: ast.ImportFrom) -> str | None:
    """The module named by `from X import ...` (relative imports resolved against `source`)."""
    if not node.level:
        return node.module
    base = source.split(".") if source in PACKAGES else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports_of(source: str, tree: ast.AST) -> Iterator[Import]:
    def visit(nodes: Iterable[ast.AST], kind: str) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.body, "typing")
                yield from visit(node.orelse, kind)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "kiln":
                        yield Import(source, alias.name, node.lineno, kind)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve_from(source, node)
                for alias in node.names if target and target.split(".")[0] == "kiln" else ():
                    sub = f"{target}.{alias.name}"
                    lazy = LAZY.get(target, {}).get(alias.name)
                    if sub in FILES:  # `from kiln.data import dataset`: the submodule
                        yield Import(source, sub, node.lineno, kind)
                    elif lazy:  # `from kiln import Trainer`: imports kiln.engine.trainer
                        yield Import(source, lazy, node.lineno, kind, alias.name)
                    else:
                        yield Import(source, target, node.lineno, kind, alias.name)
            in_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            inner = "deferred" if in_function and kind == "module" else kind
            yield from visit(ast.iter_child_nodes(node), inner)

    yield from visit([tree], "module")


TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in FILES.items()}
IMPORTS = [imp for name, tree in TREES.items() for imp in _imports_of(name, tree)]


def within(module: str, prefixes: Iterable[str]) -> bool:
    """Whether `module` is one of `prefixes` or a submodule of one."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_package_is_read() -> None:
    # The rules below are vacuous if the walk finds nothing: keep the counts from dropping.
    assert len(FILES) >= 60, sorted(FILES)
    assert {"kiln", "kiln.engine", "kiln.data", "kiln.models", "kiln.config"} <= PACKAGES
    assert LAZY["kiln"]["Trainer"] == LAZY["kiln.engine"]["Trainer"] == "kiln.engine.trainer"
    kinds = {imp.kind for imp in IMPORTS}
    assert kinds == {"module", "deferred", "typing"}, kinds
    assert len(IMPORTS) >= 200, len(IMPORTS)


WALKER_SAMPLE = """
import typing
from typing import TYPE_CHECKING
from kiln.engine.trainer import Trainer
if TYPE_CHECKING:
    from kiln.job import build_trainer
else:
    from kiln import runs
if typing.TYPE_CHECKING:
    import kiln.cli
class A:
    from kiln.data import dataset, build_datasets
    from kiln import Trainer, __version__
    def f(self):
        from kiln.models.build import _x
        if TYPE_CHECKING:
            import kiln.commands
try:
    from .sources import Row
except ImportError:
    pass
"""


def test_import_walker_kinds() -> None:
    found = [str(imp) for imp in _imports_of("kiln.data.tasks", ast.parse(WALKER_SAMPLE))]
    assert found == [
        "kiln.data.tasks:4 imports kiln.engine.trainer.Trainer (module)",
        "kiln.data.tasks:6 imports kiln.job.build_trainer (typing)",
        "kiln.data.tasks:8 imports kiln.runs (module)",
        "kiln.data.tasks:10 imports kiln.cli (typing)",
        "kiln.data.tasks:12 imports kiln.data.dataset (module)",
        "kiln.data.tasks:12 imports kiln.data.build_datasets (module)",
        "kiln.data.tasks:13 imports kiln.engine.trainer.Trainer (module)",
        "kiln.data.tasks:13 imports kiln.__version__ (module)",
        "kiln.data.tasks:15 imports kiln.models.build._x (deferred)",
        "kiln.data.tasks:17 imports kiln.commands (typing)",
        "kiln.data.tasks:19 imports kiln.data.sources.Row (module)",
    ]


# ---- rule 1: layers --------------------------------------------------------------------------

LOWER = ("kiln.config", "kiln.data", "kiln.models", "kiln.optim")
"""What the engine is built from: they know nothing of the engine or of what drives it."""
UPPER = ("kiln.engine", "kiln.callbacks", "kiln.commands", "kiln.job", "kiln.cli")

HELPERS = (
    "kiln.errors",
    "kiln.files",
    "kiln.registry",
    "kiln.runs",
    "kiln.rank",
    "kiln.device",
    "kiln.process",
)
"""The low helpers: anything may import them, and they import (almost) nothing of kiln."""
HELPERS_MAY_IMPORT = ("kiln.errors", "kiln.files", "kiln.registry", "kiln.config")

HELPER_EXCEPTIONS = {("kiln.runs", "kiln.checkpoint", "deferred")}
"""Exact exceptions (importer, imported, kind). `kiln.runs.list_checkpoints` asks
`CheckpointManager` which checkpoints are complete rather than judging manifests a second way;
kiln.checkpoint is stdlib plus kiln.files and the layout names of kiln.runs (checked below), and
the import waits for the call, so
`import kiln.runs` stays light (`test_light_imports_stay_light`)."""


def _runtime_imports(sources: Iterable[str], *, exact: bool = False) -> list[Import]:
    """Runtime imports of kiln modules by `sources` (and their submodules unless `exact`).
    `from kiln import __version__` is left out: kiln/__init__ is below everything."""
    return [
        imp
        for imp in IMPORTS
        if imp.runtime
        and (imp.source in sources if exact else within(imp.source, sources))
        and imp.target != "kiln"
    ]


def _report(bad: Iterable[Import]) -> str:
    return "\n".join(map(str, bad))


def test_lower_layers_do_not_import_the_engine_or_its_drivers() -> None:
    bad = [imp for imp in _runtime_imports(LOWER) if within(imp.target, UPPER)]
    assert not bad, _report(bad)


def test_config_imports_only_itself_and_errors() -> None:
    allowed = ("kiln.config", "kiln.errors")
    bad = [imp for imp in _runtime_imports(["kiln.config"]) if not within(imp.target, allowed)]
    assert not bad, _report(bad)


@pytest.mark.parametrize("helper", HELPERS)
def test_low_helpers_import_only_low_helpers(helper: str) -> None:
    assert helper in FILES
    bad = [
        imp
        for imp in _runtime_imports([helper], exact=True)
        if not within(imp.target, HELPERS_MAY_IMPORT)
        and (imp.source, imp.target, imp.kind) not in HELPER_EXCEPTIONS
    ]
    assert not bad, _report(bad)


@pytest.mark.parametrize(("source", "target", "kind"), sorted(HELPER_EXCEPTIONS))
def test_helper_exceptions_are_exact_and_light(source: str, target: str, kind: str) -> None:
    used = [imp for imp in IMPORTS if imp.source == source and imp.target == target]
    assert used, f"{source} no longer imports {target}: drop the exception"
    assert {imp.kind for imp in used} == {kind}, _report(used)
    # What the exception pulls in is light too: low helpers, and the layout names of `source`.
    heavy = [
        imp
        for imp in _runtime_imports([target], exact=True)
        if not within(imp.target, (*HELPERS_MAY_IMPORT, source))
    ]
    assert not heavy, _report(heavy)


def test_errors_is_the_bottom() -> None:
    bad = [imp for imp in IMPORTS if imp.source == "kiln.errors"]
    assert not bad, _report(bad)


@pytest.mark.parametrize("package", ["kiln", "kiln.engine"])
def test_package_inits_stay_lazy(package: str) -> None:
    # Any `import kiln.x.y` runs kiln/__init__ and kiln/x/__init__ first: they load only the low
    # helpers (and the config) and leave the rest to their `_LAZY` tables.
    bad = [
        imp
        for imp in _runtime_imports([package], exact=True)
        if not within(imp.target, HELPERS_MAY_IMPORT)
    ]
    assert not bad, _report(bad)


# ---- rule 2: no import cycles ----------------------------------------------------------------


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in FILES}
    for imp in IMPORTS:
        if imp.kind == "module" and imp.target in FILES:
            graph[imp.source].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        paths = {w: [start, w] for w in graph[start] if w in component}
        frontier = sorted(paths)
        while start not in paths:  # breadth first: the shortest way back to start
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
            frontier = nxt
        cycles.append(paths[start])
    return cycles


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]


def test_no_import_cycles() -> None:
    cycles = [" -> ".join(c) for c in _cycles(_module_graph())]
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


# ---- rule 3: private names stay in their package ---------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_reach(importer: str, dotted: str, line: int) -> str | None:
    """A message when `importer` reaches a private part of `dotted` (kiln.a.b._x, kiln.a._b)
    owned by another package (directory), else None."""
    parts = dotted.split(".")
    first = next((i for i, part in enumerate(parts) if _is_private(part)), None)
    if first is None:
        return None
    # The longest module prefix before the private part owns it.
    prefixes = (".".join(parts[:j]) for j in range(first, 0, -1))
    owner = next((p for p in prefixes if p in FILES), None)
    if owner is None or directory_of(owner) == directory_of(importer):
        return None
    return f"{importer}:{line} uses {dotted} (private to {directory_of(owner)})"


def _module_aliases(source: str, tree: ast.AST) -> dict[str, str]:
    """Local names bound to kiln modules by imports (`import kiln.x`, `from kiln import runs`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kiln":
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        names["kiln"] = "kiln"
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(source, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if target and sub in FILES:
                    names[alias.asname or alias.name] = sub
    return names


def _dotted(node: ast.Attribute) -> tuple[str, list[str]] | None:
    attrs = []
    expr: ast.expr = node
    while isinstance(expr, ast.Attribute):
        attrs.append(expr.attr)
        expr = expr.value
    return (expr.id, attrs[::-1]) if isinstance(expr, ast.Name) else None


def _private_uses(source: str, tree: ast.AST) -> Iterator[str]:
    for imp in _imports_of(source, tree):
        dotted = f"{imp.target}.{imp.name}" if imp.name else imp.target
        found = _private_reach(source, dotted, imp.line)
        if found:
            yield found
    aliases = _module_aliases(source, tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _dotted(node)
        if chain is None or chain[0] not in aliases:
            continue
        dotted = ".".join([aliases[chain[0]], *chain[1]])
        found = _private_reach(source, dotted, node.lineno)
        if found:
            yield found


def test_private_reach_finder() -> None:
    assert _private_reach("kiln.data.tasks", "kiln.data.sources._Problems", 1) is None
    assert _private_reach("kiln.runs", "kiln.data.sources._Problems", 1) == (
        "kiln.runs:1 uses kiln.data.sources._Problems (private to kiln.data)"
    )
    assert _private_reach("kiln.callbacks.notify", "kiln.callbacks.loggers._x", 1)
    assert _private_reach("kiln.callbacks.loggers.base", "kiln.callbacks.loggers._x", 1) is None
    assert _private_reach("kiln.job", "kiln.__version__", 1) is None
    tree = ast.parse("import kiln.data.sources as s\nimport kiln.runs\ns._P\nkiln.runs._read_json")
    assert list(_private_uses("kiln.engine.trainer", tree)) == [
        "kiln.engine.trainer:3 uses kiln.data.sources._P (private to kiln.data)",
        "kiln.engine.trainer:4 uses kiln.runs._read_json (private to kiln)",
    ]
    assert list(_private_uses("kiln.job", tree)) == [  # kiln.job and kiln.runs share kiln/
        "kiln.job:3 uses kiln.data.sources._P (private to kiln.data)"
    ]


def test_no_private_names_across_packages() -> None:
    bad = sorted({use for name, tree in TREES.items() for use in _private_uses(name, tree)})
    assert not bad, "\n".join(bad)


# ---- rule 4: what a light import really loads ------------------------------------------------


def _loaded_by(module: str) -> list[str]:
    """The modules a fresh interpreter holds after `import <module>`."""
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


ENGINE_HEAVY = ("kiln.engine.trainer", "kiln.callbacks", "kiln.data")


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("kiln.device", (*ENGINE_HEAVY, "kiln.job")),
        ("kiln.engine.status", ENGINE_HEAVY),
        ("kiln.engine.control", ENGINE_HEAVY),
        ("kiln.runs", ("torch", *ENGINE_HEAVY)),
    ],
)
def test_light_imports_stay_light(module: str, must_not_load: tuple[str, ...]) -> None:
    loaded = _loaded_by(module)
    ours = [m for m in loaded if within(m, ["kiln"])]
    heavy = [m for m in loaded if within(m, must_not_load)]
    assert not heavy, (
        f"import {module} loads {len(heavy)} module(s) under {', '.join(must_not_load)}: "
        f"{heavy[:20]} ({len(ours)} kiln modules in all: {ours})"
    )
    # Beyond the module itself: the package inits, the config they load and the low helpers.
    expected = (module, "kiln.config", *HELPERS)
    extra = [m for m in ours if m not in ("kiln", "kiln.engine") and not within(m, expected)]
    assert not extra, f"import {module} loads {len(ours)} kiln modules, among them {extra}"
    assert module in ours, f"import {module}: {len(ours)} kiln modules: {ours}"
