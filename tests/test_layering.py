"""The tree's layers: the lifecycle knows nothing of the queue layer, and nothing next to a GPU (workers/) knows the
producer. Checked twice: by reading every import statement, and by importing each module in a fresh interpreter
and looking at what it loaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE_DIRS = {"shardgen.producer": REPO / "producer", "shardgen.workers": REPO / "workers",
                "shardgen.schemas": REPO / "schemas"}


def modules_under(package: str) -> list[tuple[str, Path]]:
    """(dotted name, file) of every module of a package, from the source tree."""
    root_package = next(name for name in PACKAGE_DIRS if package == name or package.startswith(name + "."))
    directory = PACKAGE_DIRS[root_package].joinpath(*package[len(root_package) + 1 :].split(".")) if package != root_package else PACKAGE_DIRS[root_package]
    found = []
    for path in sorted(directory.rglob("*.py")):
        parts = list(path.relative_to(directory).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join([package, *parts]), path))
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute names of everything a module's import statements name (at any depth of the file)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def reaching(names: set[str], forbidden: str) -> set[str]:
    return {name for name in names if name == forbidden or name.startswith(forbidden + ".")}


@pytest.mark.parametrize(("package", "forbidden"), [
    ("shardgen.workers.lifecycle", "shardgen.workers.queue"),
    ("shardgen.workers", "shardgen.producer"),
    ("shardgen.schemas", "shardgen.workers"),
    ("shardgen.schemas", "shardgen.producer"),
])
def test_no_import_statement_crosses_a_layer(package, forbidden):
    offenders = {module: sorted(reaching(imported_names(module, path), forbidden))
                 for module, path in modules_under(package)}
    assert not {m: names for m, names in offenders.items() if names}, f"{package} must not import {forbidden}"


@pytest.mark.parametrize(("package", "forbidden"), [
    ("shardgen.workers.lifecycle", "shardgen.workers.queue"),
    ("shardgen.workers", "shardgen.producer"),
])
def test_importing_a_layer_loads_nothing_of_the_one_it_must_not_know(package, forbidden):
    modules = [name for name, _ in modules_under(package) if not name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m == {forbidden!r} or m.startswith({forbidden!r} + '.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
