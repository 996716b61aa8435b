# SPDX-License-Identifier: Apache-2.0
"""Training MRAD-FT and MRAD-CLIP with Accelerate (layer 2; paper Sec. 3.4-3.5): `trainer` (re-exported here:
`mrad_hf.training.train_mrad`, `MRADTrainingArguments`, ...) and the CLIP BPE tokenizer (`tokenization`)."""

from __future__ import annotations

from . import trainer
from .trainer import *  # noqa: F403

__all__ = list(trainer.__all__)
