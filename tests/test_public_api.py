"""The shape of the distribution: one import name, public names stated once in ``__all__``,
dependencies that point one way and no import cycle at run time."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
from pathlib import Path

import pytest

import trainbus

ROOT = Path(__file__).parents[1]
PACKAGES = [
    "trainbus.bus",
    "trainbus.sdk",
    "trainbus.worker",
    "trainbus.subscribers",
    "trainbus.api",
]
ALLOWED = {
    "bus": set(),
    "sdk": {"bus"},
    "worker": {"bus", "sdk"},
    "subscribers": {"bus"},
    "api": {"bus", "sdk", "worker", "subscribers"},
}
"""What each package may import of the project: ``api -> worker -> sdk -> bus``,
``subscribers -> bus``."""


@pytest.mark.parametrize("package_name", PACKAGES)
def test_all_lists_exactly_the_public_names(package_name: str) -> None:
    package = importlib.import_module(package_name)
    exported = set(package.__all__)
    assert len(exported) == len(package.__all__), "duplicates in __all__"
    for name in exported:
        assert hasattr(package, name), f"{package_name}.__all__ names missing {name!r}"
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and not isinstance(value, type(importlib))  # submodules are not re-exports
        and name != "annotations"
    }
    assert public == exported, f"public but not in __all__: {sorted(public - exported)}"


@pytest.mark.parametrize("package_name", PACKAGES)
def test_private_modules_declare_all(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package_name}.{info.name}")
        assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"


def _modules() -> dict[str, Path]:
    """Every module of the project by its dotted name."""
    found = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            name = package_name if path.stem == "__init__" else f"{package_name}.{path.stem}"
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports when it is imported (module level, not under
    ``TYPE_CHECKING``, not inside functions); its own parent packages left out."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    statements = list(ast.parse(path.read_text()).body)
    imported: set[str] = set()
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            statements.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            statements.extend(node.body + node.orelse + node.finalbody)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                imported.add(candidate if candidate in modules else base)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in imported if m in modules and m != name and m not in ancestors}


def test_dependencies_point_one_way() -> None:
    modules = _modules()
    for name, path in modules.items():
        own = name.split(".")[1]
        for target in _run_time_imports(name, path, modules):
            other = target.split(".")[1]
            assert other == own or other in ALLOWED[own], f"{name} imports {target}"


def test_no_import_cycle_at_run_time() -> None:
    modules = _modules()
    graph = {name: _run_time_imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_nothing_imports_a_package_by_its_bare_name() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    bare = {"bus", "sdk", "worker", "subscribers", "api"}
    for name in tracked:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.Import):
                heads = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                heads = {node.module.split(".")[0]}
            else:
                continue
            assert not heads & bare, f"{name}:{node.lineno} imports {heads & bare} bare"


def test_importing_trainbus_loads_none_of_its_packages() -> None:
    assert trainbus.__version__
    assert set(trainbus.__all__) == {"__version__"}
