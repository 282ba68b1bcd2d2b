"""kdflow's own import graph: layered, acyclic, third-party libraries behind their adapters.

The graph is built from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of kd_lib, components and pipelines, at module level and inside functions,
relative imports resolved, and ``from pkg import name`` taken as an import of the module
``pkg.name`` when there is one. docs/architecture.md explains the layers; :data:`LAYERS` is
their one table. The checks are plain functions of the graph, and the last tests feed them a
small made-up tree to show they catch what they are meant to.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kd_lib", "components", "pipelines")

# Layers, low to high, by package prefix (a module belongs to the longest prefix naming it).
# A module imports from lower layers, and from its own layer only inside its own package
# (kd_lib.data.dataset -> kd_lib.data.augment: yes; kd_lib.data -> kd_lib.models: no).
LAYERS: dict[str, int] = {
    "kd_lib.errors": 0,
    "kd_lib.plugins": 0,
    "kd_lib.config": 1,
    "kd_lib.artifacts": 2,
    "kd_lib.data": 3,
    "kd_lib.models": 3,
    "kd_lib.train": 4,
    "kd_lib.compress": 4,
    "kd_lib.evaluate": 5,
    "kd_lib.adapters": 6,
    "kd_lib.report": 7,
    "kd_lib.steps": 8,
    "kd_lib.launch": 9,
    "components": 10,
    "pipelines": 11,
}
# Package roots that are modules in their own right but no package of the table: kd_lib's
# __init__ holds only __version__, so anything may import it. Matched exactly, so a new
# kd_lib.<package> missing from LAYERS is reported rather than filed under the root.
ROOTS: dict[str, int] = {"kd_lib": 0}

# The deliberate exceptions to the layering, all here: (importer prefix, imported prefix) -> why.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("kd_lib.plugins", "kd_lib.errors"): (
        "UnknownNameError is a KdflowError: the error base is the one thing beneath the registry"
    ),
    ("kd_lib.steps", "kd_lib.launch.torchrun"): (
        "a training step starts its torchrun ranks itself; launch.torchrun holds only the process plumbing"
    ),
}

# Third-party packages only some layers may import (top-level name -> allowed prefixes): each is
# wrapped by one adapter, so swapping or faking it touches one place.
THIRD_PARTY_ONLY_IN: dict[str, tuple[str, ...]] = {
    "mlflow": (
        "kd_lib.adapters",
        # The CLI names mlflow's own exception (a registry or tracking server that answers
        # with an error) to print it as cause and fix.
        "pipelines.cli",
    ),
    "boto3": ("kd_lib.adapters",),
    "botocore": ("kd_lib.adapters",),
    # launch.pytorchjob creates and follows a step's PyTorchJob on the cluster.
    "kubernetes": ("kd_lib.adapters", "kd_lib.launch"),
    # kd_lib knows nothing of Kubeflow: the DAG, its components and the clients live above it.
    "kfp": ("components", "pipelines"),
    "kfp_server_api": ("components", "pipelines"),
    # ONNX export, quantization and sessions live in compress (onnx_runtime, onnx_export); the
    # MLflow model that serves an ONNX artifact is an adapter. The artifacts layer only stores bytes.
    "onnx": ("kd_lib.compress", "kd_lib.adapters"),
    "onnxruntime": ("kd_lib.compress", "kd_lib.adapters"),
    "onnxscript": ("kd_lib.compress", "kd_lib.adapters"),
}
# Third-party packages some layers must not import at all (top-level name -> forbidden prefixes).
THIRD_PARTY_NOT_IN: dict[str, tuple[str, ...]] = {
    # Config, errors and plugins are read by every process, the CLI included; the report renders
    # dicts. None of them needs tensors, and torch costs seconds to import.
    "torch": ("kd_lib.config", "kd_lib.errors", "kd_lib.plugins", "kd_lib.report"),
    "torchao": ("kd_lib.config", "kd_lib.errors", "kd_lib.plugins", "kd_lib.report"),
    "mlflow": ("kd_lib.report",),
}

# Imports inside a function body of a KFP component are required, not chosen: KFP ships only
# the function's source to the task, so they need no comment of their own.
COMPONENT_DECORATOR = "component"


@dataclass(frozen=True)
class Import:
    """One imported module, as the graph holds it.

    Attributes:
        importer: The importing module (``kd_lib.report.html``).
        target: The imported module: a first-party module name, or a third-party dotted name.
        first_party: Whether ``target`` is a module of the scanned packages.
        path: The importing file, relative to the scanned root.
        line: The line the import statement starts on.
        in_function: Whether the statement runs inside a function (a lazy import).
        commented: Whether a comment sits on its line or on the line above its block of imports.
        in_component: Whether the function is a KFP component (its imports are exempt from the comment rule).
    """

    importer: str
    target: str
    first_party: bool
    path: str
    line: int
    in_function: bool
    commented: bool
    in_component: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------- building the graph


def module_names(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``root/<package>`` (``__init__`` names the package)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <module> import ...`` (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    # Level 1 is the importer's own package: the module itself for an __init__, else its parent.
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _comment_lines(source: str) -> set[int]:
    """Lines holding a comment (a ``#`` token, so none inside strings)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.string.lstrip("#").strip():
            lines.add(token.start[0])
    return lines


def _is_component(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in func.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", "")
        if name == COMPONENT_DECORATOR:
            return True
    return False


def _statements(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (inside a function, inside a KFP component)."""

    def walk(
        node: ast.AST, in_function: bool, in_component: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, in_component
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, True, in_component or _is_component(child))
            else:
                yield from walk(child, in_function, in_component)

    yield from walk(tree, False, False)


def _commented(node: ast.stmt, comments: set[int], import_lines: set[int]) -> bool:
    """A comment on the statement's first line, or on the line above the run of imports it is in."""
    if node.lineno in comments:
        return True
    above = node.lineno - 1
    while above in import_lines:
        above -= 1
    return above in comments


def build_graph(root: Path, packages: Sequence[str] = PACKAGES) -> list[Import]:
    """Every import of every module under ``root/<package>``, resolved to modules.

    Args:
        root: The directory holding the packages.
        packages: The first-party top-level packages to scan.

    Returns:
        One :class:`Import` per imported module per statement (``from a import b, c`` where b
        and c are modules gives two).
    """
    modules = module_names(root, packages)
    graph = []
    for importer, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        comments = _comment_lines(source)
        statements = list(_statements(tree))
        import_lines = {
            line for node, _, _ in statements for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
        }
        is_package = path.name == "__init__.py"
        for node, in_function, in_component in statements:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(importer, is_package, node)
                if base == "__future__":
                    continue
                # `from pkg import module` is an import of pkg.module; `from module import name`, of module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                first_party = target.split(".")[0] in packages
                if first_party and target not in modules:
                    # `import kd_lib.x.y` of a name that is no module: the closest enclosing module.
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                graph.append(
                    Import(
                        importer=importer,
                        target=target,
                        first_party=first_party,
                        path=str(path.relative_to(root)),
                        line=node.lineno,
                        in_function=in_function,
                        commented=_commented(node, comments, import_lines),
                        in_component=in_component,
                    )
                )
    return graph


# ---------------------------------------------------------------- the checks


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def package_of(module: str, layers: Mapping[str, int] = LAYERS, roots: Mapping[str, int] = ROOTS) -> str | None:
    """The table entry a module belongs to (the longest matching prefix), or None."""
    if module in roots:
        return module
    matching = [p for p in layers if _matches(module, p)]
    return max(matching, key=len) if matching else None


def unlayered(
    modules: Iterable[str], layers: Mapping[str, int] = LAYERS, roots: Mapping[str, int] = ROOTS
) -> list[str]:
    """The modules that no entry of the table places."""
    return sorted(m for m in modules if package_of(m, layers, roots) is None)


def layer_violations(
    graph: Iterable[Import],
    layers: Mapping[str, int] = LAYERS,
    roots: Mapping[str, int] = ROOTS,
    exceptions: Mapping[tuple[str, str], str] = LAYER_EXCEPTIONS,
) -> list[str]:
    """Imports of a higher layer, or of another package of the same layer, not excepted."""
    levels = {**layers, **roots}
    found = []
    for imp in graph:
        if not imp.first_party:
            continue
        source, target = package_of(imp.importer, layers, roots), package_of(imp.target, layers, roots)
        if source is None or target is None or source == target or levels[target] < levels[source]:
            continue
        if any(_matches(imp.importer, a) and _matches(imp.target, b) for a, b in exceptions):
            continue
        way = "up" if levels[target] > levels[source] else "across"
        found.append(
            f"{imp.where()}: {imp.importer} (layer {levels[source]}) imports {imp.target} "
            f"(layer {levels[target]}): {way}"
        )
    return found


def cycles(graph: Iterable[Import]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each strongly connected group of first-party modules."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        edges.setdefault(imp.importer, set())
        if imp.first_party:
            edges[imp.importer].add(imp.target)
            edges.setdefault(imp.target, set())

    # Tarjan's algorithm, iterative (the graph is small, but recursion depth is not ours to pick).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))
    return [_cycle_in(group, edges) for group in groups]


def _cycle_in(group: list[str], edges: Mapping[str, set[str]]) -> list[str]:
    """A concrete cycle through the group's first module (breadth-first, so a shortest one)."""
    members = set(group)
    start = group[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {group}")  # a strongly connected group has one


def third_party_violations(
    graph: Iterable[Import],
    only_in: Mapping[str, tuple[str, ...]] = THIRD_PARTY_ONLY_IN,
    not_in: Mapping[str, tuple[str, ...]] = THIRD_PARTY_NOT_IN,
) -> list[str]:
    """Third-party imports outside the layers allowed them, or inside layers forbidden them."""
    found = []
    for imp in graph:
        if imp.first_party:
            continue
        top = imp.target.split(".")[0]
        allowed = only_in.get(top)
        if allowed is not None and not any(_matches(imp.importer, p) for p in allowed):
            found.append(f"{imp.where()}: {imp.importer} imports {imp.target}; only {', '.join(allowed)} may")
        if any(_matches(imp.importer, p) for p in not_in.get(top, ())):
            found.append(f"{imp.where()}: {imp.importer} imports {imp.target}, which it must not")
    return found


def uncommented_lazy_imports(graph: Iterable[Import]) -> list[str]:
    """Function-level imports of first-party modules with no comment saying why."""
    sites = {
        (imp.where(), imp.importer, imp.target)
        for imp in graph
        if imp.first_party and imp.in_function and not imp.in_component and not imp.commented
    }
    return [f"{where}: {importer} imports {target} inside a function" for where, importer, target in sorted(sites)]


# ---------------------------------------------------------------- the tree


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return build_graph(REPO)


def test_every_module_has_a_layer() -> None:
    missing = unlayered(module_names(REPO, PACKAGES))
    assert not missing, f"modules no entry of LAYERS places (add their package to the table): {missing}"


def test_no_import_cycles(graph: list[Import]) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_go_down_the_layers(graph: list[Import]) -> None:
    found = layer_violations(graph)
    assert not found, "imports against the layers (docs/architecture.md):\n" + "\n".join(found)


def test_third_party_libraries_stay_behind_their_adapters(graph: list[Import]) -> None:
    found = third_party_violations(graph)
    assert not found, "third-party imports out of place:\n" + "\n".join(found)


def test_every_lazy_import_says_why(graph: list[Import]) -> None:
    found = uncommented_lazy_imports(graph)
    assert not found, (
        "function-level imports need a comment on their line or the line above saying why "
        "(`# lazy: <what it saves>`):\n" + "\n".join(found)
    )


def test_the_exceptions_are_still_needed(graph: list[Import]) -> None:
    unused = [
        pair
        for pair in LAYER_EXCEPTIONS
        if not any(i.first_party and _matches(i.importer, pair[0]) and _matches(i.target, pair[1]) for i in graph)
    ]
    assert not unused, f"LAYER_EXCEPTIONS no import needs any more (remove them): {unused}"


def test_the_layer_table_names_real_packages() -> None:
    modules = module_names(REPO, PACKAGES)
    ghosts = [p for p in [*LAYERS, *ROOTS] if not any(_matches(m, p) for m in modules)]
    assert not ghosts, f"LAYERS names packages that do not exist: {ghosts}"


# ---------------------------------------------------------------- the checks check


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A made-up kd_lib with one of each fault, and one of each thing that is fine."""
    return _tree(
        tmp_path,
        {
            "kd_lib/__init__.py": "",
            "kd_lib/errors.py": "",
            "kd_lib/config/__init__.py": "from . import base\nfrom .base import Config\n",
            # Upward (config -> report), and the start of a cycle.
            "kd_lib/config/base.py": "from ..report import render\nimport torch\n",
            "kd_lib/report/__init__.py": "",
            "kd_lib/report/render.py": (
                "from kd_lib.config import Config\n"
                "from kd_lib import errors\n"
                "def draw():\n"
                "    # lazy: matplotlib is slow to import\n"
                "    import matplotlib\n"
                "    from kd_lib.data import dataset\n"
                "def plain():\n"
                "    from kd_lib.data.dataset import load\n"
            ),
            "kd_lib/data/__init__.py": "",
            "kd_lib/data/dataset.py": "import mlflow\nfrom kd_lib.models import builders\nfrom . import augment\n",
            "kd_lib/data/augment.py": "",
            "kd_lib/models/__init__.py": "",
            "kd_lib/models/builders.py": "",
            "kd_lib/elsewhere.py": "",
            "components/__init__.py": "",
            "components/step.py": (
                "from kfp import dsl\n@dsl.component\ndef step():\n    from kd_lib import steps_like\n"
            ),
        },
    )


@pytest.fixture
def fake(fake_root: Path) -> list[Import]:
    return build_graph(fake_root)


def test_the_graph_resolves_relative_and_package_imports(fake: list[Import]) -> None:
    edges = {(i.importer, i.target) for i in fake}
    assert ("kd_lib.config", "kd_lib.config.base") in edges  # from . import base (a module)
    assert ("kd_lib.config.base", "kd_lib.report.render") in edges  # from ..report import render
    assert ("kd_lib.report.render", "kd_lib.config") in edges  # from kd_lib.config import Config
    assert ("kd_lib.report.render", "kd_lib.errors") in edges  # from kd_lib import errors
    assert ("kd_lib.data.dataset", "kd_lib.data.augment") in edges
    lazy = [(i.line, i.target, i.first_party, i.commented) for i in fake if i.in_function and not i.in_component]
    assert lazy == [
        (5, "matplotlib", False, True),
        (6, "kd_lib.data.dataset", True, True),  # under the comment of its run of imports
        (8, "kd_lib.data.dataset", True, False),  # from a module import a name: the module
    ]


def test_the_checks_catch_a_cycle(fake: list[Import]) -> None:
    found = cycles(fake)
    assert found == [["kd_lib.config", "kd_lib.config.base", "kd_lib.report.render", "kd_lib.config"]]


def test_the_checks_catch_upward_and_sideways_imports(fake: list[Import]) -> None:
    found = layer_violations(fake)
    assert len(found) == 2, found
    assert re.search(r"kd_lib\.config\.base \(layer 1\) imports kd_lib\.report\.render \(layer 7\): up$", found[0])
    assert found[1].endswith("kd_lib.data.dataset (layer 3) imports kd_lib.models.builders (layer 3): across")
    # The same imports, excepted, pass.
    excepted = {("kd_lib.config.base", "kd_lib.report"): "test", ("kd_lib.data", "kd_lib.models"): "test"}
    assert layer_violations(fake, exceptions=excepted) == []


def test_the_checks_catch_a_module_outside_the_table(fake_root: Path) -> None:
    assert unlayered(module_names(fake_root, PACKAGES)) == ["kd_lib.elsewhere"]


def test_the_checks_catch_third_party_imports_out_of_place(fake: list[Import]) -> None:
    found = third_party_violations(fake)
    assert len(found) == 2, found
    assert "kd_lib.config.base imports torch, which it must not" in found[0]
    assert "kd_lib.data.dataset imports mlflow; only kd_lib.adapters, pipelines.cli may" in found[1]


def test_the_checks_catch_a_lazy_import_without_a_reason(fake: list[Import]) -> None:
    found = uncommented_lazy_imports(fake)
    # Line 6 is covered by the comment above its run of imports; the component's import is exempt.
    assert found == ["kd_lib/report/render.py:8: kd_lib.report.render imports kd_lib.data.dataset inside a function"]
