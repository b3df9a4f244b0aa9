"""The public client is explicit: `Client` mirrors `AsyncClient` method for method, each
documented with its arguments, and the client package imports the wire package only."""

from __future__ import annotations

import ast
import inspect
import tomllib
from pathlib import Path

from stimctl.client import AsyncClient, Client

ROOT = Path(__file__).resolve().parents[2]


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if not name.startswith("_") and inspect.isfunction(member)}


def test_client_has_each_async_method_with_the_same_parameters() -> None:
    """Every method a notebook calls on AsyncClient exists on Client, taking the same
    arguments; Client has no attribute facade."""
    asynchronous, blocking = _methods(AsyncClient), _methods(Client)
    assert "__getattr__" not in vars(Client)
    assert sorted(blocking) == sorted(asynchronous)
    assert {n: list(s.parameters) for n, s in blocking.items()} == {
        n: list(s.parameters) for n, s in asynchronous.items()}


def test_each_public_method_documents_its_arguments() -> None:
    """A public method has a docstring, and one taking arguments names each under Args:."""
    undocumented: list[str] = []
    for cls in (AsyncClient, Client):
        for name, sig in _methods(cls).items():
            doc = inspect.getdoc(getattr(cls, name)) or ""
            params = [p for p in sig.parameters if p not in ("self", "cls")]
            args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
            if not doc or any(f"{p}:" not in args for p in params):
                undocumented.append(f"{cls.__name__}.{name}")
    assert undocumented == []


def test_the_client_package_ships_its_type_information() -> None:
    """stimctl/py.typed exists and setuptools is told to ship it (PEP 561)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["stimctl"] == ["py.typed"]
    assert (ROOT / "stimctl" / "py.typed").is_file()


def test_the_client_imports_no_daemon_module() -> None:
    """No module of stimctl imports stimnetd: the client speaks the wire contract only."""
    daemon_imports: list[str] = []
    for path in sorted((ROOT / "stimctl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            daemon_imports += [f"{path.name}: {n}" for n in names
                               if n == "stimnetd" or n.startswith("stimnetd.")]
    assert daemon_imports == []
