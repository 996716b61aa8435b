# SPDX-License-Identifier: Apache-2.0
"""No pickle anywhere in the package: only safetensors and JSON are ever deserialised. `torch.load` is allowed in
`conversion/` (reading the official checkpoints) and only with `weights_only=True`; `torch.jit.load` (which runs
the archive's TorchScript) is forbidden everywhere, the converters included (issue 13 §1). The package never passes
`trust_remote_code=True` itself (remote code is only for users without mrad_hf; see tests/test_modeling_mrad.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
LOADING_CALLS = {("torch", "load"), ("torch.jit", "load"), ("accelerator", "load_state")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def violations(source: str, *, allow_weights_only_torch_load: bool) -> list[str]:
    """(line: problem) for each pickle import, pickle-based load, allow_pickle=True or trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES and not (allow_weights_only_torch_load and name == "pickle"):
                    found.append(f"{node.lineno}: imports {name}")
        if isinstance(node, ast.Call):
            target = _dotted(node.func)
            if _keyword_is_true(node, "allow_pickle"):
                found.append(f"{node.lineno}: {target}(allow_pickle=True)")
            if _keyword_is_true(node, "trust_remote_code"):
                found.append(f"{node.lineno}: {target}(trust_remote_code=True)")
            module, _, attr = target.rpartition(".")
            if (
                (module, attr) in LOADING_CALLS
                or attr == "load_state"
                or target.endswith("pickle.load")
                or target.endswith("pickle.loads")
            ):
                if (
                    module == "torch"
                    and attr == "load"
                    and allow_weights_only_torch_load
                    and _keyword_is_true(node, "weights_only")
                ):
                    continue
                found.append(f"{node.lineno}: {target}(...)")
    return found


def test_scanner_finds_what_it_must():
    bad = "import pickle\nimport torch\nx = torch.load('a')\ny = np.load('b', allow_pickle=True)\nz = f(trust_remote_code=True)\n"
    assert len(violations(bad, allow_weights_only_torch_load=False)) == 4
    assert (
        violations("import torch\nx = torch.load('a', weights_only=True)\n", allow_weights_only_torch_load=True) == []
    )
    assert violations("import torch\nx = torch.load('a')\n", allow_weights_only_torch_load=True) == [
        "2: torch.load(...)"
    ]
    assert (
        violations('"""pickle and torch.load in a docstring are fine"""\n', allow_weights_only_torch_load=False) == []
    )
    assert violations("import torch\nm = torch.jit.load('a.pt')\n", allow_weights_only_torch_load=True) == [
        "2: torch.jit.load(...)"
    ]


@pytest.mark.parametrize("folder, allowed", [("mrad_hf", False), ("mrad_hf/conversion", True)])
def test_no_pickle_in_the_source(folder, allowed):
    # the converters (and only they) may read plain pickled state dicts, with torch.load(weights_only=True)
    files = sorted(
        path for path in (REPO / folder).rglob("*.py") if allowed or "conversion" not in path.relative_to(REPO).parts
    )
    assert files, f"no Python files under {folder}/"
    problems = {
        str(path.relative_to(REPO)): found
        for path in files
        if (found := violations(path.read_text(encoding="utf-8"), allow_weights_only_torch_load=allowed))
    }
    assert problems == {}
