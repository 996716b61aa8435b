# SPDX-License-Identifier: Apache-2.0
"""Training MRAD-FT and MRAD-CLIP with Accelerate (layer 2; paper Sec. 3.4-3.5): `trainer` (its entry points load
from here: `mrad_hf.training.train_mrad`, `MRADTrainingArguments`, ...) and the CLIP BPE tokenizer (`tokenization`).

The names load on first use (PEP 562), as in `mrad_hf.memory`, so `import mrad_hf.training.tokenization` does not
import Accelerate."""

from __future__ import annotations

import importlib

_TRAINER_NAMES = (
    "MRADTrainingArguments",
    "MRADTrainingResult",
    "MRADTrainDataset",
    "training_stages",
    "count_trainable_parameters",
    "set_training_stage",
    "trainable_parameters",
    "train_mrad",
)

__all__ = sorted(_TRAINER_NAMES)


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        return getattr(importlib.import_module(".trainer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
