"""The layering rules of docs/architecture.md, checked on the source.

Every module of planner/, solvers/, profilers/ and emitters/ is parsed with `ast`; every import statement
counts, also those inside functions and under `if TYPE_CHECKING:` (a cycle hidden in a function is still a
cycle, and a layer reached lazily is still reached). Three rules:

- no import cycles between modules;
- each layer imports only the layers below it (LAYERS, ALLOWED): planner.core nothing of ours but itself,
  planner.cost and planner.build only planner.core, the solvers core and cost, the profilers core, cost and
  build; the roof (CLI, estimate, render/show/html, runner, emitters) anything;
- no module imports another module's private name (`from x import _name`).

A failure prints the offending edges, as `importer -> imported (file:line)`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "solvers", "profilers", "emitters")

# layer of a module: the first prefix that matches (longest first); anything else of ours is the roof
LAYERS = {
    "planner.core": "core",
    "planner.cost": "cost",
    "planner.build": "build",
    "solvers": "solvers",
    "profilers": "profilers",
}
ROOT_PACKAGE = {"planner": "core"}  # planner/__init__.py: the package root, imported by everything under it
ALLOWED = {
    "core": {"core"},
    "cost": {"core", "cost"},
    "build": {"core", "build"},
    "solvers": {"core", "cost", "solvers"},
    "profilers": {"core", "cost", "build", "profilers"},
    "roof": {"core", "cost", "build", "solvers", "profilers", "roof"},
}
# single edges allowed past ALLOWED, each with its reason
EXCEPTIONS = {
    # the intra-operator ILP reads the operator graph traced on the meta device (torch's FLOP counter)
    ("solvers.sharding", "planner.build.graph"),
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    name: str | None  # the name taken from `imported` (from x import name), None for `import x`
    where: str  # file:line

    def __str__(self) -> str:
        what = f" ({self.name})" if self.name else ""
        return f"{self.importer} -> {self.imported}{what}  [{self.where}]"


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `target` (a dotted name) lies in: itself or its longest known prefix."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def edges(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import of one of our modules by another, from every import statement anywhere in a file."""
    known = modules(root, packages)
    out = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` a name of mod
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in known else (base, a.name)
                           for a in node.names]
            else:
                continue
            for target, attr in targets:
                if target.split(".")[0] not in packages:
                    continue
                module = _resolve(target, known)
                if module is not None and module != name:
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    out.append(Edge(name, module, attr, where))
    return out


def cycles(found: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:  # recursive: the import graph is a few hundred modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def layer(module: str) -> str:
    if module in ROOT_PACKAGE:
        return ROOT_PACKAGE[module]
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return "roof"


def layer_violations(found: list[Edge]) -> list[Edge]:
    return [e for e in found if layer(e.imported) not in ALLOWED[layer(e.importer)]
            and (e.importer, e.imported) not in EXCEPTIONS]


def private_imports(found: list[Edge]) -> list[Edge]:
    return [e for e in found if e.name and e.name.startswith("_") and not e.name.startswith("__")]


def _report(title: str, lines) -> str:
    text = "\n".join(f"  {line}" for line in lines)
    print(f"{title}:\n{text}")
    return f"{title}:\n{text}"


def test_no_import_cycles():
    found = edges()
    groups = cycles(found)
    detail = []
    for group in groups:
        members = set(group)
        detail.append(" <-> ".join(group))
        detail += [f"    {e}" for e in found if e.importer in members and e.imported in members]
    assert not groups, _report("import cycles (every edge inside each)", detail)


def test_each_layer_imports_only_the_layers_below():
    bad = layer_violations(edges())
    assert not bad, _report("imports past the layering (importer [layer] -> imported [layer])",
                            [f"[{layer(e.importer)} -> {layer(e.imported)}] {e}" for e in bad])


def test_no_private_name_imported_from_another_module():
    bad = private_imports(edges())
    assert not bad, _report("private names imported from another module", bad)


def test_the_checks_see_every_package_and_the_root_package_imports_only_core():
    found = modules()
    for package in PACKAGES:
        assert package in found, f"{package}/__init__.py not found under {ROOT}"
    assert {"planner.core.plan", "planner.cost.predict", "planner.build.parallelize", "solvers.search",
            "profilers.compute", "emitters.common", "planner.runner.engines.torch_engine"} <= set(found)
    assert layer("planner") == "core" and layer("planner.cli") == "roof" and layer("planner.runner.launch") == "roof"
    assert layer("planner.core.plan") == "core" and layer("solvers") == "solvers" and layer("emitters.deepspeed") == "roof"


def test_the_checks_find_cycles_layer_breaches_and_private_imports(tmp_path):
    """The three checks on a made-up tree that breaks each rule once, in a function body and via a relative import."""
    files = {
        "planner/__init__.py": "",
        "planner/core/__init__.py": "",
        "planner/core/a.py": "def f():\n    from planner.cli import main\n",
        "planner/cost/__init__.py": "",
        "planner/cost/x.py": "from planner.cost.y import _private\n",
        "planner/cost/y.py": "from . import x\n_private = 1\n",
        "planner/cli.py": "import planner.core.a\n",
        "solvers/__init__.py": "", "profilers/__init__.py": "", "emitters/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = edges(tmp_path)
    assert cycles(found) == [["planner.cli", "planner.core.a"], ["planner.cost.x", "planner.cost.y"]]
    assert [(e.importer, e.imported) for e in layer_violations(found)] == [("planner.core.a", "planner.cli")]
    assert [(e.importer, e.imported, e.name) for e in private_imports(found)] == [
        ("planner.cost.x", "planner.cost.y", "_private")]
