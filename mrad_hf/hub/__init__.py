# SPDX-License-Identifier: Apache-2.0
"""The Hugging Face Hub (layer 2): short names, loading, pull/push of models and banks (`api`, whose entry points load
from here: `mrad_hf.hub.load_model`, `push_model`, ...), model and bank cards (`cards`), release repos (`release`).

The names load on first use (PEP 562), as in `mrad_hf.memory`, so `import mrad_hf.hub.cards` stays light."""

from __future__ import annotations

import importlib

_API_NAMES = (
    "BANK_FILENAME",
    "BANK_METADATA_FILENAME",
    "DEFAULT_HUB_NAMESPACE",
    "NAMESPACE_ENV",
    "SHORT_NAMES",
    "HubDownloadError",
    "explain_download_error",
    "hub_namespace",
    "resolve_model_id",
    "load_model",
    "load_detector_bundle",
    "pull_model",
    "push_model",
    "write_model_repo",
    "write_endpoint_handler",
    "push_memory_bank",
    "write_bank_repo",
    "load_memory_bank",
    "pull_memory_bank",
    "render_model_card",
    "render_bank_card",
    "eval_results_from_json",
)

__all__ = sorted(_API_NAMES)


def __getattr__(name: str):
    if name in _API_NAMES:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
