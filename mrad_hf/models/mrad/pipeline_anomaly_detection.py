# SPDX-License-Identifier: Apache-2.0
"""`pipeline("anomaly-detection")`: images in, scores and anomaly maps out (the MRAD inference of paper Sec. 3.3).

Registered when `mrad_hf` is imported, and shipped with saved models as custom code. Accepts file paths, URLs
(fetched by `transformers.image_utils.load_image`, with `timeout=`), PIL images, numpy arrays (H, W[, C]), bytes and
lists of them (batched with `batch_size=`). Decoding, the tiny-image check and the error type (`MRADInputError`) are
the image processor's; maps are resized by its `post_process_anomaly_detection`. Each result is a dict:

* `score` (float): the image anomaly score in [0, 1];
* `anomaly_map` (np.ndarray float32, H x W): the smoothed map resized bilinearly to the input image's own size;
* `heatmap` (PIL.Image, mode "L", W x H): that map on a fixed scale (0 -> black, 1 -> white, not stretched per image,
  so two heatmaps compare), as depth-estimation returns `depth`;
* when there is a threshold (an explicit `threshold=`, otherwise the model's calibration: `model.calibration`, or the
  config's / attached bank's record of it): `is_anomalous` (score > threshold), `label` ("anomaly" / "normal"),
  `mask` (bool H x W, map > pixel threshold) and `thresholds` ({"image", "pixel", "from": "arguments" |
  "calibration"}). The pixel threshold is `pixel_threshold=` if given, else the calibrated one, else `threshold`;
  `pixel_threshold=` alone gives `mask` only;
* with `explain=True`: `explanation`, the top-`top_k` memory entries behind the score and behind the most anomalous
  patch (`mrad_hf.tools.explain`, which needs the `mrad-hf` package: one extra feature pass per image).
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
    """Anomaly detection with an MRAD model.

    `pipe(images, threshold=None, pixel_threshold=None, explain=False, top_k=5, timeout=None)`; see the module doc.
    """

    _load_image_processor = True
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_video_processor = False  # else transformers probes for a video processor and asks about remote code

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MRADImageProcessor.from_config(self.model.config)
        if not hasattr(self.image_processor, "post_process_anomaly_detection"):
            raise TypeError(
                f"The anomaly-detection pipeline needs MRAD's image processor, got "
                f"{type(self.image_processor).__name__}; pass "
                "image_processor=MRADImageProcessor.from_config(model.config) or load the model folder."
            )

    def _sanitize_parameters(
        self, threshold=None, pixel_threshold=None, explain=None, top_k=None, timeout=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"anomaly-detection pipeline got unexpected arguments: {sorted(kwargs)}")
        preprocess = {} if timeout is None else {"timeout": float(timeout)}
        forward, postprocess = {}, {}
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
        return preprocess, forward, postprocess

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        decoded = self.image_processor.load(image, timeout=timeout)  # the one decoder: names the input on failure
        inputs = self.image_processor(decoded, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "original_sizes": inputs["original_sizes"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], explain: bool = False, top_k: int = 5) -> dict[str, Any]:
        original_sizes = model_inputs.pop("original_sizes")
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        result = {
            "anomaly_map": outputs.anomaly_map,
            "anomaly_score": outputs.anomaly_score,
            "original_sizes": original_sizes,
        }
        if explain:
            # a list, one per image: batched runs hand postprocess one item each
            explain_images = _explain_images()
            pixel_values = model_inputs["pixel_values"]
            result["explanation"] = explain_images(self.model, pixel_values, top_k=top_k, outputs=outputs)
        return result

    def _calibration(self) -> dict[str, Any] | None:
        """`model.calibration` (calibration.json), else the attached bank's record of it; warns if the bank changed since."""
        config = self.model.config
        calibration = getattr(self.model, "calibration", None) or (
            getattr(self.model, "memory_bank_metadata", None) or {}
        ).get("calibration")
        if not calibration:
            return None
        made_for = calibration.get("bank") or {}
        current = (config.image_bank_size, config.patch_bank_size)
        if made_for and (made_for.get("image_entries"), made_for.get("patch_entries")) != current:
            warnings.warn(
                f"The calibration was made with a memory bank of {made_for.get('image_entries')} image / "
                f"{made_for.get('patch_entries')} patch entries but the model now has {current[0]} / {current[1]}: "
                "its thresholds may no longer give the promised false-positive rate. Re-run `mrad calibrate` with "
                "this bank.",
                stacklevel=2,
            )
        return calibration

    def postprocess(
        self, model_outputs: dict[str, Any], threshold: float | None = None, pixel_threshold: float | None = None
    ) -> dict[str, Any]:
        source = "arguments"
        calibration = self._calibration() if threshold is None or pixel_threshold is None else None
        if calibration is not None:
            if threshold is None:
                threshold, source = float(calibration["image_threshold"]), "calibration"
            if pixel_threshold is None:
                pixel_threshold = float(calibration["pixel_threshold"])
        processed = self.image_processor.post_process_anomaly_detection(
            model_outputs,
            target_sizes=model_outputs["original_sizes"].reshape(-1, 2)[:1].tolist(),
            threshold=threshold,
            pixel_threshold=pixel_threshold,
        )[0]
        anomaly_map = processed["anomaly_map"].cpu().numpy().astype(np.float32)
        heatmap = Image.fromarray(np.round(np.clip(anomaly_map, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
        result = {"score": processed["score"], "anomaly_map": anomaly_map, "heatmap": heatmap}
        if "is_anomalous" in processed:
            result.update(is_anomalous=processed["is_anomalous"], label=processed["label"])
            pixel = threshold if pixel_threshold is None else pixel_threshold
            result["thresholds"] = {"image": threshold, "pixel": pixel, "from": source}
        if "mask" in processed:
            result["mask"] = processed["mask"].cpu().numpy()
        if "explanation" in model_outputs:
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
