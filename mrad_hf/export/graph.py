# SPDX-License-Identifier: Apache-2.0
"""The exported MRAD graph: `MRADForAnomalyDetection.forward` itself, pixels -> (anomaly_map, anomaly_score).

With `config.batch_invariant=False` (the default) every operator of the model's forward runs over the whole batch
and every other shape is a constant of the config (the prompts' lengths come from `config.prompt_token_ids`), so
`torch.export` / ONNX keep the batch axis free. `MRADExportModule` only selects the two deployment outputs; the
CLIP weights, heads and memory bank become constants of the graph. A model with `batch_invariant=True` loops over
its images (a loop over `split(1)` fixes the batch in a trace), so it is exported through a shallow copy with the
switch off: the graph then equals the model to float rounding (an exported runtime has its own kernels, so bit-exact
batch invariance is not something it could keep anyway).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

__all__ = ["MRADExportModule", "OUTPUT_NAMES", "INPUT_NAME"]

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_map", "anomaly_score")


class MRADExportModule(nn.Module):
    """`pixel_values (B, 3, S, S) -> (anomaly_map (B, S, S), anomaly_score (B,))`: the model's forward, for export."""

    def __init__(self, model: MRADForAnomalyDetection):
        super().__init__()
        if model.memory.image_keys.shape[0] == 0 or model.memory.patch_keys.shape[0] == 0:
            raise ValueError(
                "This model has no memory bank (or an empty level); an exported graph would score nothing. "
                "Build one with "
                "build_memory_bank(model, samples) or attach one with model.set_memory_bank(load_bank(path)) before exporting."
            )
        if model.config.batch_invariant:  # shares every weight and the bank; only the config differs
            model = copy.copy(model)
            model.config = copy.deepcopy(model.config)
            model.config.batch_invariant = False
        self.model = model
        self.config = model.config

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values=pixel_values)
        return output.anomaly_map, output.anomaly_score
