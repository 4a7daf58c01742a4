"""Layering and import cycles of ``src/pyvhost``, read with ``ast`` (nothing is imported).

A module may import only from its own layer of docs/design.md or a lower one; module-level imports
must not form a cycle. New modules are picked up by their top-level subpackage; a new top-level
subpackage fails here until it is given a layer in ``LAYERS`` (and in docs/design.md).
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "pyvhost"

# docs/design.md's layers, highest first. Keys are top-level subpackages (or top-level modules);
# every other top-level module (errors, closing, the package's own __init__) is in BASE.
# cli sits above check: the check command uses the check package, never the reverse.
LAYERS: dict[str, tuple[int, str]] = {
    "__main__": (10, "tools: cli"),
    "cli": (10, "tools: cli"),
    "check": (9, "tools: check"),
    "devices": (8, "devices"),
    # pyvhost.testing: test-double devices on the vhost-user layer (comes with the daemon rework).
    "testing": (8, "devices"),
    "daemon": (7, "framework"),
    "driver": (6, "driver"),
    "user": (5, "vhost-user"),
    "kernel": (4, "kernel"),
    "control": (3, "control: the interface kernel and user vhost share"),
    "virtio": (2, "virtio"),
}
BASE = (1, "base: top-level modules")

Kind = Literal["module", "type-checking", "local"]


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int
    kind: Kind

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_modules(src: Path) -> dict[str, Path]:
    """Every module under ``src/pyvhost`` by dotted name (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` starts with (``a.b.Class`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(
    nodes: Iterable[ast.AST], kind: Kind
) -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
    """Every import among ``nodes`` with where it runs: at import time, only for type checkers, or
    inside a function (a lambda cannot hold one)."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, kind
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _statements(ast.iter_child_nodes(node), "local")
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, "local" if kind == "local" else "type-checking")
            yield from _statements(node.orelse, kind)
        else:
            yield from _statements(ast.iter_child_nodes(node), kind)


def read_imports(src: Path) -> tuple[dict[str, Path], list[Import]]:
    """The modules under ``src/pyvhost`` and every import between two of them."""
    modules = find_modules(src)
    edges: list[Import] = []
    for source, path in modules.items():
        package = source if _is_package(source, modules) else source.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, kind in _statements(tree.body, "module"):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from pkg import sub`` imports pkg.sub; ``from mod import name`` imports mod.
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for name in names:
                target = _resolve(name, modules) if name.split(".")[0] == ROOT else None
                edge = Import(source, target or "", path, node.lineno, kind)
                if target is not None and target != source and edge not in edges:
                    edges.append(edge)
    return modules, edges


def layer_of(module: str, modules: dict[str, Path]) -> tuple[int, str] | None:
    """The layer of ``module`` by its top-level subpackage; None for an unlayered subpackage."""
    parts = module.split(".")
    if len(parts) == 1:
        return BASE
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    top = f"{ROOT}.{parts[1]}"
    if not _is_package(top, modules):
        return BASE
    return None


def unlayered(src: Path) -> list[str]:
    """Top-level subpackages that ``LAYERS`` does not place."""
    modules = find_modules(src)
    return sorted(
        name for name in modules if name.count(".") == 1 and layer_of(name, modules) is None
    )


def upward_imports(src: Path) -> list[str]:
    """One line per import of a higher layer, wherever the import statement is."""
    modules, edges = read_imports(src)
    problems = []
    for edge in edges:
        low, high = layer_of(edge.source, modules), layer_of(edge.target, modules)
        if low is not None and high is not None and high[0] > low[0]:
            problems.append(
                f"{edge.where()}: {edge.source} ({low[1]}) imports {edge.target} ({high[1]}),"
                f" a higher layer ({edge.kind} import)"
            )
    return problems


def _graph(src: Path) -> dict[str, dict[str, Import]]:
    """Module-level imports as a graph. Importing ``a.b.c`` from outside package ``a.b`` also
    runs ``a.b``'s ``__init__``, so that is an edge too; inside ``a.b`` it is already running."""
    modules, edges = read_imports(src)
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for edge in edges:
        if edge.kind != "module":
            continue
        parts = edge.target.split(".")
        targets = [".".join(parts[:n]) for n in range(2, len(parts) + 1)]
        for target in targets:
            inside = edge.source == target or edge.source.startswith(target + ".")
            if not inside:
                graph[edge.source].setdefault(target, edge)
    return graph


def _reachable(start: str, graph: dict[str, dict[str, Import]]) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def _components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Groups of more than one module that all import each other (strongly connected)."""
    reach = {node: _reachable(node, graph) for node in graph}
    found: list[list[str]] = []
    placed: set[str] = set()
    for node in sorted(graph):
        if node in placed:
            continue
        component = sorted({node} | {m for m in reach[node] if node in reach[m]})
        placed.update(component)
        if len(component) > 1:
            found.append(component)
    return found


def _cycle_through(
    start: str, members: set[str], graph: dict[str, dict[str, Import]]
) -> list[Import]:
    """The shortest chain of imports from ``start`` back to itself inside one component."""
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    for node in queue:
        for target, edge in sorted(graph[node].items()):
            if target == start:
                return [*paths[node], edge]
            if target in members and target not in paths:
                paths[target] = [*paths[node], edge]
                queue.append(target)
    raise AssertionError(f"{start} is in a component but on no cycle")


def import_cycles(src: Path) -> list[str]:
    """One line per cycle of module-level imports, each import named with its file and line."""
    graph = _graph(src)
    problems = []
    for component in _components(graph):
        chain = _cycle_through(component[0], set(component), graph)
        steps = " -> ".join(f"{edge.source} ({edge.where()}) -> {edge.target}" for edge in chain)
        problems.append(f"import cycle among {', '.join(component)}: {steps}")
    return problems


# -- the real tree ---------------------------------------------------------------------------


def test_every_top_level_subpackage_has_a_layer() -> None:
    assert unlayered(SRC) == [], "give these a layer in LAYERS and in docs/design.md"


def test_no_module_imports_a_higher_layer() -> None:
    problems = upward_imports(SRC)
    assert not problems, "\n".join(problems)


def test_no_module_level_import_cycle() -> None:
    problems = import_cycles(SRC)
    assert not problems, "\n".join(problems)


def test_the_real_tree_is_read() -> None:
    """Guards the checks above against passing on an empty or misread tree."""
    modules, edges = read_imports(SRC)
    assert {"pyvhost.errors", "pyvhost.virtio.memory", "pyvhost.cli.main"} <= set(modules)
    assert any(
        e.source == "pyvhost.daemon.server" and e.target == "pyvhost.user.backend" for e in edges
    )


# -- the checker on planted input ------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A source tree under ``tmp_path/src`` with ``files`` (paths relative to src/pyvhost)."""
    src = tmp_path / "src"
    for name, text in {"__init__.py": "", **files}.items():
        path = src / ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_a_planted_upward_import_in_a_copy_of_the_real_tree_fails(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(SRC / ROOT, src / ROOT, ignore=shutil.ignore_patterns("__pycache__"))
    memory = src / ROOT / "virtio" / "memory.py"
    lines = memory.read_text().splitlines()
    lines.append("from pyvhost.daemon.server import Daemon")
    memory.write_text("\n".join(lines) + "\n")

    assert upward_imports(src) == [
        f"{memory}:{len(lines)}: pyvhost.virtio.memory (virtio) imports"
        " pyvhost.daemon.server (framework), a higher layer (module import)"
    ]


@pytest.mark.parametrize(
    ("text", "line", "kind"),
    [
        ("import pyvhost.user.messages\n", 1, "module"),
        ("from pyvhost.user import messages\n", 1, "module"),
        ("from ..user.messages import X\n", 1, "module"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pyvhost.user\n",
            3,
            "type-checking",
        ),
        (
            "import typing\nif typing.TYPE_CHECKING:\n    from pyvhost.user import X\n",
            3,
            "type-checking",
        ),
        ("def f() -> None:\n    from pyvhost.user.messages import X\n", 2, "local"),
        ("class C:\n    def f(self) -> None:\n        import pyvhost.user.messages\n", 3, "local"),
        ("try:\n    import pyvhost.user.messages\nexcept ImportError:\n    pass\n", 2, "module"),
    ],
)
def test_upward_imports_are_found_in_every_form(
    tmp_path: Path, text: str, line: int, kind: str
) -> None:
    src = _tree(
        tmp_path,
        {
            "user/__init__.py": "X = 1\n",
            "user/messages.py": "X = 1\n",
            "virtio/__init__.py": "",
            "virtio/ring.py": text,
        },
    )
    [problem] = upward_imports(src)
    assert problem.startswith(f"{src / ROOT / 'virtio' / 'ring.py'}:{line}: pyvhost.virtio.ring")
    assert "(virtio) imports pyvhost.user" in problem
    assert problem.endswith(f"({kind} import)")


def test_downward_same_layer_and_base_imports_pass(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "errors.py": "",
            "_util.py": "from pyvhost import errors\n",
            "user/__init__.py": "",
            "user/messages.py": "from pyvhost.errors import X\nfrom pyvhost.virtio import ring\n",
            "user/frontend.py": "from . import messages\nfrom pyvhost._util import f\n",
            "virtio/__init__.py": "",
            "virtio/ring.py": "import os\nfrom pyvhost import errors\n",
        },
    )
    assert upward_imports(src) == []


def test_a_base_module_importing_a_layer_fails(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"_util.py": "import pyvhost.virtio\n", "virtio/__init__.py": ""})
    [problem] = upward_imports(src)
    assert "pyvhost._util (base: top-level modules) imports pyvhost.virtio (virtio)" in problem


def test_check_may_not_import_cli(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {"cli/__init__.py": "", "check/__init__.py": "from pyvhost.cli import main\n"},
    )
    [problem] = upward_imports(src)
    assert "pyvhost.check (tools: check) imports pyvhost.cli (tools: cli)" in problem


def test_a_new_subpackage_without_a_layer_is_reported(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"vdpa/__init__.py": "", "vdpa/ioctl.py": "", "errors.py": ""})
    assert unlayered(src) == ["pyvhost.vdpa"]


def test_a_module_level_cycle_names_modules_and_lines(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "daemon/__init__.py": "",
            "daemon/device.py": "import os\nfrom pyvhost.daemon.loop import EventLoop\n",
            "daemon/loop.py": "from pyvhost.daemon import device\n",
        },
    )
    device, loop = src / ROOT / "daemon" / "device.py", src / ROOT / "daemon" / "loop.py"
    assert import_cycles(src) == [
        "import cycle among pyvhost.daemon.device, pyvhost.daemon.loop:"
        f" pyvhost.daemon.device ({device}:2) -> pyvhost.daemon.loop"
        f" -> pyvhost.daemon.loop ({loop}:1) -> pyvhost.daemon.device"
    ]


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "user/__init__.py": "from pyvhost.user.backend import B\n",
            "user/backend.py": "from pyvhost.virtio.ring import R\n",
            "virtio/__init__.py": "",
            "virtio/ring.py": "from pyvhost.user.messages import M\n",
            "user/messages.py": "",
        },
    )
    [problem] = import_cycles(src)
    assert "among pyvhost.user, pyvhost.user.backend, pyvhost.virtio.ring:" in problem


@pytest.mark.parametrize(
    "loop_text",
    [
        "import typing\nif typing.TYPE_CHECKING:\n    from pyvhost.daemon import device\n",
        "def f() -> None:\n    from pyvhost.daemon import device\n",
    ],
)
def test_type_checking_and_function_local_imports_make_no_cycle(
    tmp_path: Path, loop_text: str
) -> None:
    src = _tree(
        tmp_path,
        {
            "daemon/__init__.py": "from pyvhost.daemon.device import D\n",
            "daemon/device.py": "from pyvhost.daemon.loop import EventLoop\n",
            "daemon/loop.py": loop_text,
        },
    )
    assert import_cycles(src) == []
