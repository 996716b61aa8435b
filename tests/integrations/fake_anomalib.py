# SPDX-License-Identifier: Apache-2.0
"""A MINIMAL FAKE of the few anomalib classes `mrad_hf.integrations.anomalib` touches, for CI only.

Real anomalib cannot be imported beside the torch 2.13.0 CPU build CI uses: its torchvision (PyPI 0.28.0, the only
build for torch 2.13) links libtorch_cuda.so / libc10_cuda.so and `import torchvision` fails with
"RuntimeError: operator torchvision::nms does not exist". This fake reproduces only the contract the adapter uses
(`LearningType`, `AnomalibModule.__init__(pre_processor, post_processor, evaluator, visualizer)`, `PreProcessor`,
`PostProcessor`, and a batch dataclass with `.image` and `.update(**fields)` returning the batch, as anomalib 2.x
does). tests/integrations/test_anomalib.py runs the same adapter against real anomalib where it is installed.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types

import torch
from torch import nn


class LearningType(str, enum.Enum):  # anomalib/__init__.py
    ONE_CLASS = "one_class"
    ZERO_SHOT = "zero_shot"
    FEW_SHOT = "few_shot"


class PreProcessor(nn.Module):  # anomalib.pre_processing.PreProcessor(transform)
    def __init__(self, transform=None):
        super().__init__()
        self.transform = transform


class PostProcessor(nn.Module):  # anomalib.post_processing.PostProcessor(enable_normalization, enable_thresholding)
    def __init__(self, enable_normalization: bool = True, enable_thresholding: bool = True):
        super().__init__()
        self.enable_normalization, self.enable_thresholding = enable_normalization, enable_thresholding


class AnomalibModule(nn.Module):  # anomalib.models.components.AnomalibModule (LightningModule in the real one)
    def __init__(self, pre_processor=True, post_processor=True, evaluator=True, visualizer=True):
        super().__init__()
        self.pre_processor = self.configure_pre_processor() if pre_processor is True else (pre_processor or None)
        self.post_processor = self.configure_post_processor() if post_processor is True else (post_processor or None)
        self.evaluator, self.visualizer = evaluator, visualizer


@dataclasses.dataclass
class ImageBatch:  # the fields of anomalib.data.ImageBatch the adapter reads and writes
    image: torch.Tensor
    gt_label: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    pred_score: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None
    pred_mask: torch.Tensor | None = None

    def update(self, in_place: bool = True, **changes):
        for key, value in changes.items():
            setattr(self, key, value)
        return self


def install(monkeypatch) -> None:
    """Make `import anomalib` (and the submodules the adapter imports) resolve to this fake for one test."""
    root = types.ModuleType("anomalib")
    root.LearningType = LearningType
    modules = {
        "anomalib": root,
        "anomalib.models": types.ModuleType("anomalib.models"),
        "anomalib.models.components": types.ModuleType("anomalib.models.components"),
        "anomalib.pre_processing": types.ModuleType("anomalib.pre_processing"),
        "anomalib.post_processing": types.ModuleType("anomalib.post_processing"),
    }
    modules["anomalib.models.components"].AnomalibModule = AnomalibModule
    modules["anomalib.pre_processing"].PreProcessor = PreProcessor
    modules["anomalib.post_processing"].PostProcessor = PostProcessor
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "mrad_hf.integrations.anomalib", raising=False)
