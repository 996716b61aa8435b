# SPDX-License-Identifier: Apache-2.0
"""The package's layering (docs/architecture.md): imports run down the layers only, with no circles, and the
remote-code unit (`mrad_hf/models/mrad/`) imports nothing of mrad_hf outside itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mrad_hf"

#: top-level sub-package -> layer; a module may import modules of its own package or of lower layers
LAYERS = {
    "models": 0,
    "runtime": 1,  # mrad_hf/runtime.py: CPU features, dtype "auto", allocator, compile
    "data": 1,
    "memory": 1,
    "evaluation": 2,
    "training": 2,
    "tools": 2,
    "export": 2,
    "conversion": 2,
    "hub": 2,
    "integrations": 3,
    "cli": 3,
}
#: what the remote-code unit may import besides its own siblings (a saved model must load without mrad_hf)
CORE_THIRD_PARTY = {"torch", "transformers", "safetensors", "numpy", "PIL", "tqdm", "huggingface_hub"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import a, b
                    found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
                    continue
            else:
                target = node.module
            found.append((target, node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mrad_hf":
        return None
    if len(parts) == 1 or parts[1] in ("__main__",):
        return 4  # the package root (public API) and `python -m mrad_hf`
    return LAYERS.get(parts[1], 4)


def _files():
    # hub/templates/ holds files written into Hub repos (the Inference Endpoints handler), not package modules
    return sorted(path for path in PACKAGE.rglob("*.py") if "templates" not in path.relative_to(PACKAGE).parts)


def test_every_subpackage_has_a_layer():
    subpackages = {path.parent.relative_to(PACKAGE).parts[0] for path in _files() if path.parent != PACKAGE}
    assert subpackages <= set(LAYERS), (
        f"give these a layer in LAYERS and docs/architecture.md: {subpackages - set(LAYERS)}"
    )


def test_imports_run_down_the_layers():
    upward = []
    for path in _files():
        module = _module_name(path)
        own_layer = _layer(module)
        own_package = module.split(".")[:2]
        for target, line in _imports(path):
            target_layer = _layer(target)
            if (
                target_layer is None
                or target.split(".")[:2] == own_package
                or module in ("mrad_hf", "mrad_hf.__main__")
            ):
                continue
            if target_layer > own_layer or (own_layer == 0 and target_layer != 0):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert upward == []


def test_the_remote_code_unit_imports_only_its_siblings_and_the_core_libraries():
    outside = []
    for path in sorted((PACKAGE / "models" / "mrad").glob("*.py")):
        for target, line in _imports(path):
            top = target.split(".")[0]
            if top == "mrad_hf":
                if not target.startswith("mrad_hf.models.mrad"):
                    outside.append(f"{path.name}:{line} imports {target}")
            elif top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                outside.append(f"{path.name}:{line} imports {target} (not a dependency a saved model may assume)")
    assert outside == []


def test_no_import_circles_between_modules():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(path) for path in _files()}
    for path in _files():
        module = _module_name(path)
        edges = set()
        for target, _ in _imports(path):
            while target and target not in modules:  # `from pkg.mod import name` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + ".") and target != "mrad_hf":
                edges.add(target)
        graph[module] = edges
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
