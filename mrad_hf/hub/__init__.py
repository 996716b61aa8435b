# SPDX-License-Identifier: Apache-2.0
"""The Hugging Face Hub (layer 2): short names, loading, pull/push of models and banks (`api`, re-exported here),
model and bank cards (`cards`), release repos (`release`)."""

from __future__ import annotations

from . import api
from .api import *  # noqa: F403 - the documented entry points: mrad_hf.hub.load_model, push_model, ...

__all__ = list(api.__all__)
