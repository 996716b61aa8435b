# SPDX-License-Identifier: Apache-2.0
"""Every `mrad_hf` name the README, the docs and the Hub card templates mention exists: a reader who copies
`mrad_hf.hub.load_model` or `from mrad_hf.tools.calibration import calibrate` gets it, not an ImportError."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "mrad_hf" / "hub" / "templates").iterdir()]
)
OPTIONAL = ("mrad_hf.integrations.anomalib",)  # needs the `anomalib` extra (its own tests import it when present)


def _mentioned_names(text: str) -> set[str]:
    names = {name for name in re.findall(r"\bmrad_hf(?:\.\w+)+", text) if not name.endswith("_")}
    for module, imported in re.findall(r"from (mrad_hf[\w.]*) import ([\w, ]+)", text):
        names |= {f"{module}.{name.strip()}" for name in imported.split(",") if name.strip()}
    return names


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_mrad_hf_name_in_the_docs_exists(document):
    text = document.read_text(encoding="utf-8")
    missing = sorted(name for name in _mentioned_names(text) if not name.startswith(OPTIONAL) and not _resolves(name))
    assert not missing, f"{document.name} mentions names that do not exist: {missing}"
    if document.name == "README.md":
        assert "mrad_hf.hub.load_model" in text  # the check reads real references


@pytest.mark.parametrize("package, module", [("mrad_hf.hub", "api"), ("mrad_hf.training", "trainer")])
def test_packages_export_their_modules_entry_points_lazily(package, module):
    """`mrad_hf.hub.load_model` / `mrad_hf.training.train_mrad` are the module's own objects, listed once more in the
    package (so that importing a light sibling such as `training.tokenization` does not import the heavy module)."""
    exported = importlib.import_module(package)
    source = importlib.import_module(f"{package}.{module}")
    assert sorted(exported.__all__) == sorted(source.__all__)
    assert all(getattr(exported, name) is getattr(source, name) for name in source.__all__)
