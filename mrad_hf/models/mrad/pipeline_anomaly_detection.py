# SPDX-License-Identifier: Apache-2.0
"""`pipeline("anomaly-detection")`: images in, scores and anomaly maps out (the MRAD inference of paper Sec. 3.3).

Registered when `mrad_hf` is imported. Accepts file paths, PIL images, numpy arrays (H, W[, C]) and lists of
them (batched with `batch_size=`). Each result is a dict of plain Python / numpy values:

* `score` (float): the image anomaly score;
* `anomaly_map` (np.ndarray float32, H x W): the smoothed map resized bilinearly to the input image's own size;
* decisions, when there is a threshold: an explicit `threshold=` argument, otherwise the model's calibration
  (`model.config.calibration`, or the attached bank's `metadata["calibration"]`; see `mrad_hf.calibration`):
  `is_anomalous` (bool, score > threshold), `label` ("anomaly" / "normal"), `mask` (bool H x W,
  map > pixel threshold) and `thresholds` ({"image", "pixel", "from": "arguments" | "calibration"}). The pixel
  threshold is `pixel_threshold=` if given, else the calibrated one, else `threshold`;
* with `explain=True`: `explanation`, the top-`top_k` memory entries behind the score and behind the most
  anomalous patch, with provenance and similarity (`mrad_hf.explain`; one extra feature pass per image).

This file imports only torch, numpy, transformers and its siblings, so it can travel with a model as remote code.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.pipelines.base import Pipeline

from .image_processing_mrad import MRADImageProcessor

__all__ = ["AnomalyDetectionPipeline"]


class AnomalyDetectionPipeline(Pipeline):
    """Anomaly detection with an MRAD model: `pipe(images, threshold=None, pixel_threshold=None, explain=False, top_k=5)`."""

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_video_processor = False  # else transformers probes for a video processor and asks about remote code

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MRADImageProcessor.from_config(self.model.config)

    def _sanitize_parameters(
        self, threshold: float | None = None, pixel_threshold: float | None = None, explain: bool | None = None, top_k: int | None = None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"anomaly-detection pipeline got unexpected arguments: {sorted(kwargs)}")
        postprocess, forward = {}, {}
        if threshold is not None:
            postprocess["threshold"] = float(threshold)
        if pixel_threshold is not None:
            postprocess["pixel_threshold"] = float(pixel_threshold)
        if explain is not None:
            forward["explain"] = bool(explain)
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k is the number of memory entries to show, at least 1; got {top_k}.")
            forward["top_k"] = int(top_k)
        return {}, forward, postprocess

    def preprocess(self, image: Any) -> dict[str, torch.Tensor]:
        inputs = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "original_sizes": inputs["original_sizes"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], explain: bool = False, top_k: int = 5) -> dict[str, Any]:
        original_sizes = model_inputs.pop("original_sizes")
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        result = {"anomaly_map": outputs.anomaly_map, "anomaly_score": outputs.anomaly_score, "original_sizes": original_sizes}
        if explain:
            import importlib  # explanations need mrad_hf installed (not part of the remote-code unit)

            explain_images = importlib.import_module("mrad_hf.tools.explain").explain_images

            # a list, one per image: batched runs hand postprocess one item each
            result["explanation"] = explain_images(self.model, model_inputs["pixel_values"], top_k=top_k, outputs=outputs)
        return result

    def _calibration(self) -> dict[str, Any] | None:
        """The model's calibration (config first, then the attached bank's metadata); warns if the bank changed since."""
        config = self.model.config
        calibration = getattr(config, "calibration", None) or (getattr(config, "memory_bank_metadata", None) or {}).get("calibration")
        if not calibration:
            return None
        made_for = calibration.get("bank") or {}
        current = (config.image_bank_size, config.patch_bank_size)
        if made_for and (made_for.get("image_entries"), made_for.get("patch_entries")) != current:
            warnings.warn(
                f"The calibration was made with a memory bank of {made_for.get('image_entries')} image / {made_for.get('patch_entries')} "
                f"patch entries but the model now has {current[0]} / {current[1]}: its thresholds may no longer give the promised "
                "false-positive rate. Re-run `mrad calibrate` with this bank.",
                stacklevel=2,
            )
        return calibration

    def postprocess(self, model_outputs: dict[str, torch.Tensor], threshold: float | None = None, pixel_threshold: float | None = None):
        height, width = (int(v) for v in model_outputs["original_sizes"].reshape(-1)[:2])
        anomaly_map = model_outputs["anomaly_map"].float().reshape(1, 1, *model_outputs["anomaly_map"].shape[-2:])
        if anomaly_map.shape[-2:] != (height, width):
            anomaly_map = F.interpolate(anomaly_map, size=(height, width), mode="bilinear", align_corners=False)
        result = {
            "score": float(model_outputs["anomaly_score"].reshape(-1)[0]),
            "anomaly_map": anomaly_map[0, 0].cpu().numpy().astype(np.float32),
        }
        source = "arguments"
        calibration = self._calibration() if threshold is None or pixel_threshold is None else None
        if calibration is not None:
            if threshold is None:
                threshold, source = float(calibration["image_threshold"]), "calibration"
            if pixel_threshold is None:
                pixel_threshold = float(calibration["pixel_threshold"])
        if threshold is not None:
            pixel_threshold = threshold if pixel_threshold is None else pixel_threshold
            result["is_anomalous"] = result["score"] > threshold
            result["label"] = "anomaly" if result["is_anomalous"] else "normal"
            result["mask"] = result["anomaly_map"] > pixel_threshold
            result["thresholds"] = {"image": threshold, "pixel": pixel_threshold, "from": source}
        elif pixel_threshold is not None:
            result["mask"] = result["anomaly_map"] > pixel_threshold
        if "explanation" in model_outputs:
            explanation = model_outputs["explanation"]
            result["explanation"] = explanation[0] if isinstance(explanation, list) else explanation
        return result
