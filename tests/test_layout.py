"""The package's architecture, checked: layers, no import cycle, module sizes, scripts' loops.

Layers, from the bottom (a module imports only from its own layer or lower ones):

0. pure math and I/O: ``functional``, ``diagnostics``, ``safe_io``
1. ``modules`` (the ensemble, the batched MLP, the multi-agent critic)
2. ``objectives`` (SPQR and the losses)
3. ``data`` (offline loading, reference scores, the dataset builder)
4. ``training`` (config, builders, the run's logging/checkpoint protocol, restoring agents)
5. ``analysis`` (statistics, figures, reports)

Entry points (``__main__``/``cli`` modules), the package's ``__init__`` and the deprecated
old locations (thin re-exports) sit on top. Every ``import`` statement counts, including the
ones inside functions: a function-level import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from _helpers import package_modules

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "torchrl_spqr"

LAYERS = {
    "torchrl_spqr.functional": 0,
    "torchrl_spqr.diagnostics": 0,
    "torchrl_spqr.safe_io": 0,
    "torchrl_spqr._deprecation": 0,  # the deprecated shims' one helper (imports lazily)
    "torchrl_spqr.modules": 1,
    "torchrl_spqr.objectives": 2,
    "torchrl_spqr.data": 3,
    "torchrl_spqr.training": 4,
    "torchrl_spqr.analysis": 5,
}
#: old flat locations kept for one release as thin, warning re-exports (and CLI entry points)
DEPRECATED = {
    "torchrl_spqr.loss",
    "torchrl_spqr.ensemble",
    "torchrl_spqr.datasets",
    "torchrl_spqr.plot",
    "torchrl_spqr.multiagent",
    "torchrl_spqr.objectives.ensemble",
}
MAX_LINES = 600
LONG_MARK = "Long module:"  # a docstring line giving the reason a module exceeds MAX_LINES


MODULES = package_modules()


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path) -> set[str]:
    """Internal modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
            targets = []
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in MODULES else mod)
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t.startswith("torchrl_spqr") and t != name:
                deps.add(t)
    return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    if name in DEPRECATED or name == "torchrl_spqr":
        return None
    if name.rpartition(".")[2] in ("__main__", "cli") and not name.startswith(
        "torchrl_spqr.training"
    ):
        return None  # entry points sit on top
    best = None
    for prefix, layer in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            best = layer
    return best


def test_every_module_has_a_layer():
    unplaced = sorted(
        n
        for n in MODULES
        if _layer(n) is None
        and n not in DEPRECATED
        and n != "torchrl_spqr"
        and n.rpartition(".")[2] not in ("__main__", "cli")
        and not n.startswith("torchrl_spqr.configs")
    )
    assert not unplaced, f"modules outside the layers {sorted(LAYERS)}: {unplaced}"


def test_imports_go_down_the_layers():
    bad = []
    for name, deps in GRAPH.items():
        here = _layer(name)
        if here is None:
            continue
        for dep in deps:
            if dep in DEPRECATED:
                bad.append(f"{name} imports the deprecated location {dep}")
                continue
            there = _layer(dep)
            if there is not None and there > here:
                bad.append(f"{name} (layer {here}) imports {dep} (layer {there})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_small_or_say_why():
    long = []
    for name, path in MODULES.items():
        n = len(path.read_text().splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if LONG_MARK not in doc:
            long.append(f"{name}: {n} lines")
    assert not long, f"over {MAX_LINES} lines without a '{LONG_MARK}' reason: {long}"


@pytest.mark.parametrize(
    "algo", ["sac_ens_spqr", "redq_spqr", "sac_n_spqr", "edac_spqr", "cql_spqr", "masac_spqr"]
)
def test_each_script_holds_its_loop(algo):
    src = (ROOT / "sota_scripts" / algo / f"{algo}.py").read_text()
    tree = ast.parse(src)
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))]
    assert loops, f"{algo}.py has no training loop of its own"
    assert not re.search(r"train_(online|offline|multiagent)\b", src), (
        f"{algo}.py delegates its loop to the library"
    )
    # the update is a visible function in the script (or its utils.py)
    utils = (ROOT / "sota_scripts" / algo / "utils.py").read_text()
    assert re.search(r"def \w*update\w*\(", src + utils), f"{algo}: no visible update function"


def test_readme_layout_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"torchrl_spqr/[\w/]+(?:\.py)?", section))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README layout names paths that do not exist: {missing}"
    for sub in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        rel = f"torchrl_spqr/{sub.name}/"
        assert rel in section or rel.rstrip("/") in section, f"README layout omits {rel}"
