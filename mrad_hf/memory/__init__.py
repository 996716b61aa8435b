# SPDX-License-Identifier: Apache-2.0
"""Memory banks (layer 1, paper Sec. 3.2): building (`building`), samples and batches (`samples`), the bank file and
atomic saves (`files`), living-bank tools: add, merge, remove, de-duplicate, inspect (`tools`).

The names below load on first use (PEP 562), so `import mrad_hf.memory.files` stays light."""

from __future__ import annotations

import importlib

_LAZY_EXPORTS = {
    "atomic_directory": ".files",
    "atomic_write": ".files",
    "build_memory_bank": ".building",
    "load_bank": ".files",
    "save_bank": ".files",
    "save_model": ".files",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
