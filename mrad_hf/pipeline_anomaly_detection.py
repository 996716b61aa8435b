# SPDX-License-Identifier: Apache-2.0
"""`pipeline("anomaly-detection")`: images in, scores and anomaly maps out (the MRAD inference of paper Sec. 3.3).

Registered when `mrad_hf` is imported. Accepts file paths, PIL images, numpy arrays (H, W[, C]) and lists of
them (batched with `batch_size=`). Each result is a dict of plain Python / numpy values:

* `score` (float): the image anomaly score;
* `anomaly_map` (np.ndarray float32, H x W): the smoothed map resized bilinearly to the input image's own size;
* with `threshold=`: `label` ("anomaly" / "normal", score > threshold) and `mask` (bool H x W,
  map > `pixel_threshold`, which defaults to `threshold`).

This file imports only torch, numpy, transformers and its siblings, so it can travel with a model as remote code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.pipelines.base import Pipeline

from .image_processing_mrad import MRADImageProcessor

__all__ = ["AnomalyDetectionPipeline"]


class AnomalyDetectionPipeline(Pipeline):
    """Anomaly detection with an MRAD model: `pipe(image_or_images, threshold=None, pixel_threshold=None)`."""

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MRADImageProcessor.from_config(self.model.config)

    def _sanitize_parameters(self, threshold: float | None = None, pixel_threshold: float | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"anomaly-detection pipeline got unexpected arguments: {sorted(kwargs)}")
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = float(threshold)
        if pixel_threshold is not None:
            postprocess["pixel_threshold"] = float(pixel_threshold)
        return {}, {}, postprocess

    def preprocess(self, image: Any) -> dict[str, torch.Tensor]:
        inputs = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "original_sizes": inputs["original_sizes"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        original_sizes = model_inputs.pop("original_sizes")
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        return {"anomaly_map": outputs.anomaly_map, "anomaly_score": outputs.anomaly_score, "original_sizes": original_sizes}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], threshold: float | None = None, pixel_threshold: float | None = None):
        height, width = (int(v) for v in model_outputs["original_sizes"].reshape(-1)[:2])
        anomaly_map = model_outputs["anomaly_map"].float().reshape(1, 1, *model_outputs["anomaly_map"].shape[-2:])
        if anomaly_map.shape[-2:] != (height, width):
            anomaly_map = F.interpolate(anomaly_map, size=(height, width), mode="bilinear", align_corners=False)
        result = {
            "score": float(model_outputs["anomaly_score"].reshape(-1)[0]),
            "anomaly_map": anomaly_map[0, 0].cpu().numpy().astype(np.float32),
        }
        if threshold is not None:
            result["label"] = "anomaly" if result["score"] > threshold else "normal"
            result["mask"] = result["anomaly_map"] > (threshold if pixel_threshold is None else pixel_threshold)
        elif pixel_threshold is not None:
            result["mask"] = result["anomaly_map"] > pixel_threshold
        return result
