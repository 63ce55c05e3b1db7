"""Each package states its public names once, in ``__all__``; everything else is private."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["bus", "worker", "subscribers", "api"]


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


def test_bus_imports_nothing_of_the_project() -> None:
    import bus

    for info in pkgutil.iter_modules(bus.__path__):
        source = importlib.import_module(f"bus.{info.name}").__loader__.get_source(  # type: ignore[union-attr]
            f"bus.{info.name}"
        )
        assert source is not None
        for forbidden in ("worker", "subscribers", "api"):
            assert f"from {forbidden}" not in source and f"import {forbidden}" not in source
