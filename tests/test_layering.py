"""The package structure: which layer may import which, no import cycles, no private names
reached across packages, and what a light import really loads.

The static rules read every module under kiln/ with `ast` (nothing is imported). An import is

    typing    inside `if TYPE_CHECKING:`: never runs, so it is free;
    deferred  inside a function: runs when the function is called;
    module    anywhere else (module level, class bodies, try blocks): runs at import.

"Runtime" means deferred or module. Every module stands on a floor, given by the top-level
module or package it lives in (FLOORS; docs/architecture.md, "Layers"), and imports at runtime
only from the floors it stands on (MAY_IMPORT), bottom to top:

    command line        cli, __main__, commands/, launcher      anything
    run drivers         serve/, sweep/, client                  the run directory, not the engine
    job                 job, helpers
    callbacks           callbacks/
    engine | tools      engine/ | anomalies, explain, report, export/   side by side
    building blocks     data/, models/, optim, metrics/, checkpoint, plots
    config | low helpers   files, registry, runs + rundir/, rank, device, process, kiln/__init__
    errors

The engine knows one thing above it, the Callback interface (and kiln.job, from the Trainer's
constructor and from_config, on call): UPWARD_EXCEPTIONS lists every such import.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
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
    "kiln.rundir",
    "kiln.rundir.layout",
    "kiln.rundir.read",
    "kiln.rank",
    "kiln.device",
    "kiln.process",
)
"""The low helpers: anything may import them, and they import (almost) nothing of kiln."""
HELPERS_MAY_IMPORT = ("kiln.errors", "kiln.files", "kiln.registry", "kiln.rundir", "kiln.config")

HELPER_EXCEPTIONS = {("kiln.rundir.read", "kiln.checkpoint", "deferred")}
"""Exact exceptions (importer, imported, kind). `kiln.runs.list_checkpoints` asks
`CheckpointManager` which checkpoints are complete rather than judging manifests a second way;
kiln.checkpoint is stdlib plus kiln.files and the layout names of kiln.rundir (checked below), and
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


@pytest.mark.parametrize("package", ["kiln", "kiln.engine", "kiln.callbacks"])
def test_package_inits_stay_lazy(package: str) -> None:
    # Any `import kiln.x.y` runs kiln/__init__ and kiln/x/__init__ first: they load only the low
    # helpers (and the config) and leave the rest to their `_LAZY` tables.
    bad = [
        imp
        for imp in _runtime_imports([package], exact=True)
        if not within(imp.target, HELPERS_MAY_IMPORT)
    ]
    assert not bad, _report(bad)


# ---- rule 1b: every module has a floor (docs/architecture.md, "Layers") -----------------------
#
# A module's floor follows from its unit: the top-level module or package it lives in
# (kiln.serve.routers.jobs -> kiln.serve), so a new module in an existing package is placed by
# its package, and a new top-level module or package fails `test_item06_every_module_is_placed`
# until it is given a floor here and in docs/architecture.md.

FLOORS: dict[str, tuple[str, ...]] = {
    "errors": ("kiln.errors",),
    "config": ("kiln.config",),
    "low helpers": (
        "kiln",  # the package's __init__ only (see `unit_of`)
        "kiln.files",
        "kiln.registry",
        "kiln.runs",
        "kiln.rundir",
        "kiln.rank",
        "kiln.device",
        "kiln.process",
    ),
    "building blocks": (
        "kiln.data",
        "kiln.models",
        "kiln.optim",
        "kiln.metrics",
        "kiln.checkpoint",
        "kiln.plots",
    ),
    "tools": ("kiln.anomalies", "kiln.explain", "kiln.report", "kiln.export", "kiln.preflight"),
    "engine": ("kiln.engine",),
    "callbacks": ("kiln.callbacks",),
    "job": ("kiln.job", "kiln.helpers"),
    "run drivers": ("kiln.serve", "kiln.sweep", "kiln.client"),
    "command line": ("kiln.cli", "kiln.__main__", "kiln.commands", "kiln.launcher"),
}
"""Each floor's units. The engine and the tools stand side by side on the building blocks and
know nothing of each other; the run drivers start `kiln train` processes and read the run
directory, so they stand beside the engine, not on it."""

_BASE = ("errors", "config", "low helpers")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "errors": (),
    "config": ("errors",),
    "low helpers": _BASE,
    "building blocks": (*_BASE, "building blocks"),
    "tools": (*_BASE, "building blocks", "tools"),
    "engine": (*_BASE, "building blocks", "engine"),
    "callbacks": (*_BASE, "building blocks", "engine", "tools", "callbacks"),
    "job": (*_BASE, "building blocks", "engine", "tools", "callbacks", "job"),
    "run drivers": (*_BASE, "tools", "run drivers"),
    "command line": tuple(FLOORS),
}
"""The floors a floor's modules may import at runtime (typing-only imports are free)."""

FLOOR_NOTES = {
    "engine": "above it, only the Callback interface (kiln.callbacks.base)",
    "run drivers": "they start `kiln train` and read the run directory (kiln.runs)",
}

UPWARD_EXCEPTIONS: dict[tuple[str, str, str], str] = {
    ("kiln.engine", "kiln.callbacks.base", "*"): (
        "the Callback interface: the engine fires events at it and knows no callback"
    ),
    ("kiln.engine.trainer", "kiln.job.build_trainer", "deferred"): (
        "Trainer.from_config, a shortcut for kiln.job.build_trainer"
    ),
    ("kiln.engine.trainer", "kiln.job.job_callbacks", "deferred"): (
        "the constructor asks the job for the config's callbacks (Trainer(cfg) runs them too)"
    ),
    ("kiln.rundir.read", "kiln.checkpoint", "deferred"): (
        "kiln.runs.list_checkpoints asks CheckpointManager (HELPER_EXCEPTIONS)"
    ),
    ("kiln.sweep", "kiln.callbacks.notify", "deferred"): (
        "the sweep's notifications go through the run's notification senders"
    ),
    ("kiln.sweep.tracking", "kiln.callbacks.loggers.mlflow", "deferred"): (
        "the sweep's MLflow parent run uses the tracker's default tracking URI"
    ),
}
"""(importer, imported, kind) -> why. The importer is a module or a package (its modules too);
the imported is a module, or `module.name` for `from module import name`; kind "*" is any
runtime kind. Keep these few and exact: a stale one fails `test_item06_exceptions_are_used`."""

KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()
"""(importer, imported, kind) that break a floor rule today; issue 27: to fix. Remove an entry
when its import is fixed (a stale entry fails `test_item06_exceptions_are_used`)."""


def unit_of(module: str) -> str:
    """The top-level module or package `module` belongs to (`kiln` for the package init)."""
    return ".".join(module.split(".")[:2])


UNIT_FLOOR = {unit: floor for floor, units in FLOORS.items() for unit in units}


def floor_of(module: str) -> str | None:
    return UNIT_FLOOR.get(unit_of(module))


def where(imp: Import) -> str:
    """`kiln/engine/trainer.py:19`: the file and line of an import, for the failure message."""
    return f"{FILES[imp.source].relative_to(ROOT)}:{imp.line}"


def _excepted(imp: Import, table: Iterable[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    """The entry of `table` that allows `imp`, if any."""
    taken = {imp.target, f"{imp.target}.{imp.name}"} if imp.name else {imp.target}
    for entry in table:
        source, target, kind = entry
        if within(imp.source, [source]) and target in taken and kind in ("*", imp.kind):
            return entry
    return None


def floor_breaches(imports: Iterable[Import], floor: str) -> list[str]:
    """Runtime imports by `floor`'s modules of a floor it may not import, less the exceptions:
    one line each, `file:line: importer (floor) imports target (its floor, kind): ...`."""
    bad = []
    for imp in imports:
        if not imp.runtime or imp.target == "kiln" or floor_of(imp.source) != floor:
            continue
        other = floor_of(imp.target)
        if other == floor or other in MAY_IMPORT[floor]:
            continue
        if _excepted(imp, UPWARD_EXCEPTIONS) or _excepted(imp, KNOWN_VIOLATIONS):
            continue
        what = f"{imp.target}.{imp.name}" if imp.name else imp.target
        allowed = ", ".join(MAY_IMPORT[floor]) or "nothing of kiln"
        bad.append(
            f"{where(imp)}: {imp.source} ({floor}) imports {what} ({other}, {imp.kind}); "
            f"{floor} may import only: {allowed}"
            + (f"; {FLOOR_NOTES[floor]}" if floor in FLOOR_NOTES else "")
        )
    return bad


def test_item06_every_module_is_placed() -> None:
    unplaced = sorted(name for name in FILES if floor_of(name) is None)
    assert not unplaced, (
        f"{len(unplaced)} module(s) on no floor: {unplaced}; add their package or module to "
        "FLOORS in tests/test_layering.py and to the layer table of docs/architecture.md"
    )
    units = {unit_of(name) for name in FILES}
    stale = sorted(set(UNIT_FLOOR) - units)
    assert not stale, f"FLOORS names what kiln/ no longer has: {stale}"
    assert sorted(MAY_IMPORT) == sorted(FLOORS)
    assert floor_of("kiln.serve.routers.new") == "run drivers"  # placed by its package


@pytest.mark.parametrize("floor", list(FLOORS))
def test_item06_floors_import_only_what_they_stand_on(floor: str) -> None:
    bad = floor_breaches(IMPORTS, floor)
    assert not bad, f"{len(bad)} import(s) against the layers:\n" + "\n".join(bad)


def test_item06_exceptions_are_used() -> None:
    # An exception nothing uses any more hides the next import of its kind: drop it.
    for table in (UPWARD_EXCEPTIONS, KNOWN_VIOLATIONS):
        for entry in table:
            used = [imp for imp in IMPORTS if imp.runtime and _excepted(imp, [entry])]
            assert used, f"{entry} is no longer imported: remove it from the exceptions"


def test_item06_engine_knows_only_the_callback_interface_above_it() -> None:
    # The rule of docs/architecture.md, spelled out: of the floors above the engine, it reaches
    # only callbacks.base, and kiln.job from the Trainer's constructor and from_config (on call).
    allowed = {
        ("kiln.callbacks.base", None),
        ("kiln.callbacks.base", "Callback"),
        ("kiln.job", "build_trainer"),
        ("kiln.job", "job_callbacks"),
    }
    bad = [
        imp
        for imp in _runtime_imports(["kiln.engine"])
        if floor_of(imp.target) not in MAY_IMPORT["engine"]
        and (imp.target, imp.name) not in allowed
    ]
    assert not bad, "the engine imports above it:\n" + "\n".join(
        f"{where(imp)}: imports {imp.target}{f'.{imp.name}' if imp.name else ''} ({imp.kind})"
        for imp in bad
    )


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _doc_section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _unit_named(token: str) -> str:
    """`serve/` -> kiln.serve, `cli.py` -> kiln.cli, `__init__.py` -> kiln."""
    name = token.removesuffix("/").removesuffix(".py")
    return "kiln" if name == "__init__" else f"kiln.{name}"


def test_item06_the_documented_floors_are_the_tested_ones() -> None:
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in _doc_section("Layers").splitlines()
        if line.startswith("| ") and not line.startswith("| floor ")
    ]
    documented = {
        row[0]: sorted(map(_unit_named, re.findall(r"`([^`]+)`", row[1]))) for row in rows
    }
    assert list(documented) == list(reversed(FLOORS)), "docs/architecture.md: floors, top down"
    assert documented == {floor: sorted(units) for floor, units in FLOORS.items()}


def test_item06_the_feature_table_names_every_module() -> None:
    # Every file of kiln/ (package inits aside) is named in docs/architecture.md, or a folder of
    # it with `/*` (generated files: the database migrations).
    named = set(re.findall(r"`([\w/.*]+)`", ARCHITECTURE.read_text()))
    missing = []
    for path in sorted(FILES.values()):
        parts = path.relative_to(PACKAGE).parts
        rel = "/".join(parts)
        folders = ["/".join(parts[:i]) + "/*" for i in range(1, len(parts))]
        if path.name != "__init__.py" and rel not in named and not named.intersection(folders):
            missing.append(rel)
    assert not missing, f"docs/architecture.md names no {missing}: add each to the feature table"
    # And what the tables name is there.
    sections = _doc_section("Layers") + _doc_section("Where each feature lives")
    tables = "\n".join(line for line in sections.splitlines() if line.startswith("|"))
    gone = [
        name
        for name in re.findall(r"`([\w/]+(?:\.py|/))`", tables)
        if not (PACKAGE / name).exists()
    ]
    assert not gone, f"docs/architecture.md names what kiln/ does not have: {gone}"


PLANTED = {  # the three upward imports of issue 27's acceptance, as each would be caught
    "kiln.engine": "def f():\n    from kiln.callbacks.progress import ProgressCallback\n",
    "kiln.models": "import kiln.sweep\n",
    "kiln.serve": "from kiln.engine.trainer import Trainer\n",
}


def test_item06_planted_upward_imports_are_named_by_file_and_line() -> None:
    found = []
    for source, code in PLANTED.items():
        found += floor_breaches(_imports_of(source, ast.parse(code)), floor_of(source) or "")
    assert [line.split(";")[0] for line in found] == [
        "kiln/engine/__init__.py:2: kiln.engine (engine) imports "
        "kiln.callbacks.progress.ProgressCallback (callbacks, deferred)",
        "kiln/models/__init__.py:1: kiln.models (building blocks) imports kiln.sweep "
        "(run drivers, module)",
        "kiln/serve/__init__.py:1: kiln.serve (run drivers) imports kiln.engine.trainer.Trainer "
        "(engine, module)",
    ]


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


RUN_DRIVER_HEAVY = (
    "torch",
    "transformers",
    "kiln.engine",
    "kiln.data",
    "kiln.models",
    "kiln.optim",
    "kiln.metrics",
    "kiln.job",
    "kiln.callbacks",
)
"""What the run drivers never load on import: they start `kiln train` and read run directories."""


@pytest.mark.parametrize(
    "module", ["kiln.sweep.controller", "kiln.serve.app", "kiln.client", "kiln.runs"]
)
def test_item06_run_drivers_load_no_torch(module: str) -> None:
    if module.startswith("kiln.serve") and importlib.util.find_spec("fastapi") is None:
        pytest.skip("kiln serve needs the serve extra (fastapi)")
    loaded = _loaded_by(module)
    assert module in loaded
    heavy = [m for m in loaded if within(m, RUN_DRIVER_HEAVY)]
    assert not heavy, f"import {module} loads {len(heavy)} heavy module(s): {heavy[:20]}"


@pytest.mark.slow
def test_item06_the_engine_loads_only_the_callback_interface() -> None:
    # Statically the engine imports kiln.callbacks.base; this checks what that really runs (the
    # package's __init__ too): no callback, no job, nothing of the floors above the engine.
    loaded = _loaded_by("kiln.engine.trainer")
    above = [
        m
        for m in loaded
        if floor_of(m) in ("callbacks", "job", "tools", "run drivers", "command line")
        and m not in ("kiln.callbacks", "kiln.callbacks.base")
    ]
    assert "kiln.engine.trainer" in loaded
    assert not above, f"import kiln.engine.trainer loads {len(above)} module(s) above it: {above}"


# ---- item 4: one place builds the config's callbacks -----------------------------------------


def _callback_classes() -> set[str]:
    """The classes of kiln.callbacks that derive from Callback (directly or through another)."""
    bases = {
        node.name: {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
        for name, tree in TREES.items()
        if within(name, ["kiln.callbacks"])
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    found = {"Callback"}
    while grown := {c for c, b in bases.items() if b & found} - found:
        found |= grown
    return found - {"Callback"}


CALLBACK_BUILDERS = {
    "kiln.callbacks.defaults": "the config's callbacks",
    "kiln.job": "RankWhereabouts, and KeepFreedMemory for a process the run owns",
}


def test_item04_one_place_builds_the_config_callbacks() -> None:
    classes = _callback_classes()
    assert {"ProgressCallback", "EarlyStopping", "TrackingCallback", "NotifyCallback"} <= classes
    built = sorted(
        f"{FILES[name].relative_to(ROOT)}:{node.lineno} builds {callee}"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (callee := getattr(node.func, "id", getattr(node.func, "attr", None))) in classes
    )
    elsewhere = [
        b
        for b in built
        if not any(FILES[m].relative_to(ROOT).as_posix() in b for m in CALLBACK_BUILDERS)
    ]
    assert not elsewhere, "callbacks built outside kiln/callbacks/defaults.py:\n" + "\n".join(
        elsewhere
    )
    assert len(built) >= 6, built  # progress, early stopping, plots, trackers, notify, export
