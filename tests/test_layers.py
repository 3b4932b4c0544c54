"""The package's layers: every import (module level or inside a function) points down or within its own package,
and module-level imports have no cycle. Read from the source with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spnet_dist"
# low -> high; a module may import its own package and anything in a lower layer
LAYERS = [
    {"errors", "distributed", "osutil", "cfgtools"},
    {"config"},
    {"models", "data"},
    {"evaluation"},
    {"methods"},
    {"preflight"},
    {"tracking"},
    {"engine"},
    {"launch"},
    {"commands"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported spnet_dist module, run at import time) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}  # run at import time (``if TYPE_CHECKING:`` bodies are not)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "spnet_dist":
                out.append((n, id(node) in top))
    return out


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py; add it")


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _known(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_points_down_or_within_its_package():
    modules = {_module_name(p) for p in _sources()}
    bad = []
    for path in _sources():
        me = _module_name(path)
        if me == "spnet_dist":
            continue
        for name, _ in _imports(path):
            target = _known(name, modules)
            if target in (None, "spnet_dist"):
                continue
            same_package = target.split(".")[:2] == me.split(".")[:2]
            if not same_package and _layer(target) >= _layer(me):
                bad.append(f"{me} imports {target}")
    assert not bad, "imports upward or sideways:\n" + "\n".join(sorted(set(bad)))


def test_no_import_cycle_at_module_level():
    modules = {_module_name(p) for p in _sources()}
    graph = {_module_name(p): {t for n, top in _imports(p) if top and (t := _known(n, modules))
                               and t != _module_name(p)} for p in _sources()}
    graph = {k: {t for t in v if not k.startswith(t + ".")} for k, v in graph.items()}  # a package's own __init__

    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself can fail: an upward import in a model file is reported."""
    src = tmp_path / "spnet_dist" / "models" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from ..engine import loop\n\ndef f():\n    from spnet_dist.launch import task\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "spnet_dist"
    try:
        names = [n for n, _ in _imports(src)]
    finally:
        PACKAGE = saved
    assert "spnet_dist.engine.loop" in names and "spnet_dist.launch.task" in names
    assert _layer("spnet_dist.engine.loop") > _layer("spnet_dist.models.x")
