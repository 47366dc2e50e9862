"""The package's layout: the import graph of ``smog_scale`` has no cycle (imports under ``TYPE_CHECKING`` and
inside functions count), each sub-package imports only what its ``__init__`` allows, nothing imports the command
lines, and the size limits hold; test modules import shared code from ``tests/helpers.py`` only."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "smog_scale"
# Each area (a sub-package, or a top-level module) and the areas it may import besides itself. The rules of
# the sub-packages are the ones their __init__ docstrings state.
ALLOWED = {
    "dist": set(),  # the one seam to torch.distributed
    "models": set(),
    "data": set(),
    "config": {"data"},
    "method": {"dist", "config", "models"},
    "eval": {"dist", "data", "method"},
    "training": {"dist", "config", "data", "models", "method", "eval"},
    "export": {"config", "data", "models", "training"},
    "launch": {"dist", "config", "data", "models", "method", "training"},
    "train": {"dist", "config", "data", "models", "method", "eval", "training"},  # the trainer's command line
}
ENTRY_POINTS = {"smog_scale.train", "smog_scale.launch.__main__"}  # run, never imported
ROOT_MODULE = "smog_scale"  # __version__; it imports models.backbone (timm names), which imports nothing


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The smog_scale modules ``name`` imports, wherever the import statement stands (a function, ``if
    TYPE_CHECKING``); ``from package import module`` names the module, ``from module import name`` the module."""
    path = MODULES[name]
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: imports(name) for name in MODULES}


def area(name: str) -> str:
    return name.split(".")[1] if name != ROOT_MODULE else ROOT_MODULE


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name)


def test_each_area_imports_only_what_it_may():
    wrong = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                   if name != ROOT_MODULE and area(target) not in (area(name), ROOT_MODULE)
                   and area(target) not in ALLOWED[area(name)])
    assert not wrong, wrong
    assert GRAPH[ROOT_MODULE] == {"smog_scale.models.backbone"} and not GRAPH["smog_scale.models.backbone"]
    assert {area(name) for name in MODULES} == set(ALLOWED) | {ROOT_MODULE}, "an area without rules"


def test_nothing_imports_a_command_line():
    assert ENTRY_POINTS <= set(MODULES)
    importers = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets & ENTRY_POINTS)
    assert not importers, importers


def test_sub_packages_say_what_they_hold_and_may_import():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower() and len([line for line in doc.splitlines() if line.strip()]) <= 3, init


def test_size_limits():
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= 6, top_level
    long = sorted(f"{path.relative_to(ROOT)}: {n}" for path in MODULES.values()
                  if (n := len(path.read_text().splitlines())) > 400)
    assert not long, long


def test_test_modules_import_no_other_test_module():
    tests = Path(__file__).resolve().parent
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(tests)} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_") or n.startswith("test_")]
    assert not found, found
