# SPDX-License-Identifier: Apache-2.0
"""`pipeline("anomaly-detection")`: images in, scores and anomaly maps out (the MRAD inference of paper Sec. 3.3).

Registered when `mrad_hf` is imported and shipped with saved models as custom code. Inputs: paths, URLs (`timeout=`),
PIL images, arrays (H, W[, C]), bytes, lists of them (`batch_size=`); decoding, the tiny-image check and the error
(`MRADInputError`) are the image processor's, as is the map resize. Each result is a dict: `score` (float in [0, 1]);
`anomaly_map` (float32 H x W at the input's size); `heatmap` (PIL "L", 0 -> black, 1 -> white on a fixed scale so two
heatmaps compare, as depth-estimation's `depth`); with a threshold (`threshold=`, else the model's calibration:
`model.calibration` or the bank's record) `is_anomalous`, `label` ("anomaly" / "normal"), `mask` (map > pixel
threshold: `pixel_threshold=`, else the calibrated one, else `threshold`; `pixel_threshold=` alone gives `mask` only)
and `thresholds` ({"image", "pixel", "from": "arguments" | "calibration"}); with `explain=True`, `explanation` (the
top-`top_k` memory entries behind the score and the worst patch; `mrad_hf.tools.explain`, one more feature pass).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.pipelines.base import Pipeline

from .image_processing_mrad import MRADImageProcessor

__all__ = ["AnomalyDetectionPipeline"]


class AnomalyDetectionPipeline(Pipeline):
    """`pipe(images, threshold=None, pixel_threshold=None, explain=False, top_k=5, timeout=None)`; see the module doc."""

    _load_image_processor = True
    _load_processor = _load_tokenizer = _load_feature_extractor = False
    _load_video_processor = False  # else transformers probes for a video processor and asks about remote code

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MRADImageProcessor.from_config(self.model.config)
        if not hasattr(self.image_processor, "post_process_anomaly_detection"):
            name = type(self.image_processor).__name__
            raise TypeError(
                f"The anomaly-detection pipeline needs MRAD's image processor, got {name}; pass "
                "image_processor=MRADImageProcessor.from_config(model.config) or load the model folder."
            )

    def _sanitize_parameters(self, threshold=None, pixel_threshold=None, explain=None, top_k=None, timeout=None, **kw):
        if kw:
            raise TypeError(f"anomaly-detection pipeline got unexpected arguments: {sorted(kw)}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k is the number of memory entries to show, at least 1; got {top_k}.")
        given = {"threshold": threshold, "pixel_threshold": pixel_threshold, "explain": explain, "top_k": top_k}
        given = {key: {"explain": bool, "top_k": int}.get(key, float)(v) for key, v in given.items() if v is not None}
        forward = {key: given.pop(key) for key in ("explain", "top_k") if key in given}
        return ({} if timeout is None else {"timeout": float(timeout)}), forward, given

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        decoded = self.image_processor.load(image, timeout=timeout)  # the one decoder: names the input on failure
        inputs = self.image_processor(decoded, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "original_sizes": inputs["original_sizes"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], explain: bool = False, top_k: int = 5) -> dict[str, Any]:
        outputs, pixel_values = self.model(pixel_values=model_inputs["pixel_values"]), model_inputs["pixel_values"]
        result = {"anomaly_map": outputs.anomaly_map, "anomaly_score": outputs.anomaly_score}
        result["original_sizes"] = model_inputs["original_sizes"]
        if explain:
            result["explanation"] = _explain_images()(self.model, pixel_values, top_k=top_k, outputs=outputs)
        return result

    def _calibration(self) -> dict[str, Any] | None:
        """`model.calibration` (calibration.json), else the attached bank's record of it; warns if the bank changed since."""
        bank_metadata = getattr(self.model, "memory_bank_metadata", None) or {}
        calibration = getattr(self.model, "calibration", None) or bank_metadata.get("calibration")
        if not calibration:
            return None
        made_for = calibration.get("bank") or {}
        current = (self.model.config.image_bank_size, self.model.config.patch_bank_size)
        if made_for and (made_for.get("image_entries"), made_for.get("patch_entries")) != current:
            warnings.warn(
                f"The calibration was made with a memory bank of {made_for.get('image_entries')} image / "
                f"{made_for.get('patch_entries')} patch entries but the model now has {current[0]} / {current[1]}: its "
                "thresholds may no longer give the promised false-positive rate. Re-run `mrad calibrate` with it.",
                stacklevel=2,
            )
        return calibration

    def postprocess(
        self, model_outputs: dict[str, Any], threshold: float | None = None, pixel_threshold: float | None = None
    ) -> dict[str, Any]:
        calibration = (self._calibration() if threshold is None or pixel_threshold is None else None) or {}
        source = "calibration" if threshold is None and calibration else "arguments"
        threshold = float(calibration["image_threshold"]) if threshold is None and calibration else threshold
        if pixel_threshold is None and calibration:
            pixel_threshold = float(calibration["pixel_threshold"])
        size = model_outputs["original_sizes"].reshape(-1, 2)[:1].tolist()
        post_process = self.image_processor.post_process_anomaly_detection
        processed = post_process(model_outputs, size, threshold=threshold, pixel_threshold=pixel_threshold)[0]
        anomaly_map = processed["anomaly_map"].cpu().numpy().astype(np.float32)
        heatmap = Image.fromarray(np.round(np.clip(anomaly_map, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
        result = {"score": processed["score"], "anomaly_map": anomaly_map, "heatmap": heatmap}
        if "is_anomalous" in processed:
            result.update(is_anomalous=processed["is_anomalous"], label=processed["label"])
            pixel = threshold if pixel_threshold is None else pixel_threshold
            result["thresholds"] = {"image": threshold, "pixel": pixel, "from": source}
        if "mask" in processed:
            result["mask"] = processed["mask"].cpu().numpy()
        if "explanation" in model_outputs:  # batched runs hand postprocess a list of one
            explanation = model_outputs["explanation"]
            result["explanation"] = explanation[0] if isinstance(explanation, list) else explanation
        return result


def _explain_images():
    """`mrad_hf.tools.explain.explain_images`, imported on request: explanations are not part of the remote code."""
    import importlib

    try:
        return importlib.import_module("mrad_hf.tools.explain").explain_images
    except ImportError as error:
        raise ImportError(
            "explain=True needs the mrad-hf package (pip install mrad-hf): explanations are not part "
            "of the code a saved model carries. Score without explain=True, or install it."
        ) from error
