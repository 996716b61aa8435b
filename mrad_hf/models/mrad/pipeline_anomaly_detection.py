# SPDX-License-Identifier: Apache-2.0
"""`pipeline("anomaly-detection")`: images in, scores and anomaly maps out (the MRAD inference of paper Sec. 3.3).

Registered by `import mrad_hf`, shipped with saved models as custom code. Inputs: paths, URLs (`timeout=`), PIL images,
arrays (H, W[, C]), bytes, lists of them (`batch_size=`); decoding, the tiny-image check, `MRADInputError` and the map
resize are the image processor's. Each result is a dict: `score` (float in [0, 1]); `anomaly_map` (float32, the
input's H x W); `heatmap` (PIL "L", 0 -> black, 1 -> white on a fixed scale so two heatmaps compare, as
depth-estimation's `depth`); with a threshold (`threshold=`, else `model.calibration`, else the bank's record of it)
`is_anomalous`, `label` ("anomaly" / "normal") and `thresholds` ({"image", "pixel", "from": "arguments" |
"calibration"}); `mask` (map > `pixel_threshold=`, else the calibrated one, else `threshold`; `pixel_threshold=` alone
gives `mask` only); with `explain=True`, `explanation` (the top-`top_k` memory entries behind the score and the worst
patch; `mrad_hf.tools.explain`, one more feature pass).
"""

import importlib
import warnings

import numpy as np
from PIL import Image
from transformers.pipelines.base import Pipeline

from .image_processing_mrad import MRADImageProcessor

__all__ = ["AnomalyDetectionPipeline"]


class AnomalyDetectionPipeline(Pipeline):
    """`pipe(images, threshold=None, pixel_threshold=None, explain=False, top_k=5, timeout=None)`; the module doc."""

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
        preprocess = {} if timeout is None else {"timeout": float(timeout)}
        forward = {"explain": (explain, bool), "top_k": (top_k, int)}
        forward = {key: cast(value) for key, (value, cast) in forward.items() if value is not None}
        thresholds = {"threshold": threshold, "pixel_threshold": pixel_threshold}
        postprocess = {key: float(value) for key, value in thresholds.items() if value is not None}
        return preprocess, forward, postprocess

    def preprocess(self, image, timeout=None):
        inputs = self.image_processor(self.image_processor.load(image, timeout=timeout), return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "original_sizes": inputs["original_sizes"]}

    def _forward(self, model_inputs, explain=False, top_k=5):
        pixel_values, sizes = model_inputs["pixel_values"], model_inputs["original_sizes"]
        outputs = self.model(pixel_values=pixel_values)
        result = {"anomaly_map": outputs.anomaly_map, "anomaly_score": outputs.anomaly_score, "original_sizes": sizes}
        if explain:
            try:  # imported on request: explanations are not part of the code a saved model carries
                explain_images = importlib.import_module("mrad_hf.tools.explain").explain_images
            except ImportError as error:
                raise ImportError(
                    "explain=True needs mrad-hf (pip install mrad-hf); or score without explain=True."
                ) from error
            result["explanation"] = explain_images(self.model, pixel_values, top_k=top_k, outputs=outputs)
        return result

    def postprocess(self, model_outputs, threshold=None, pixel_threshold=None):
        calibration = self._calibration() if threshold is None or pixel_threshold is None else None
        source = "calibration" if threshold is None and calibration else "arguments"
        if calibration:
            threshold = float(calibration["image_threshold"]) if threshold is None else threshold
            pixel_threshold = float(calibration["pixel_threshold"]) if pixel_threshold is None else pixel_threshold
        size = model_outputs["original_sizes"].reshape(-1, 2)[:1].tolist()
        post_process = self.image_processor.post_process_anomaly_detection
        processed = post_process(model_outputs, size, threshold=threshold, pixel_threshold=pixel_threshold)[0]
        anomaly_map = processed["anomaly_map"].cpu().numpy().astype(np.float32)
        heatmap = Image.fromarray(np.round(np.clip(anomaly_map, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
        result = {"score": processed["score"], "anomaly_map": anomaly_map, "heatmap": heatmap}
        if "is_anomalous" in processed:
            pixel = threshold if pixel_threshold is None else pixel_threshold
            result.update(is_anomalous=processed["is_anomalous"], label=processed["label"])
            result["thresholds"] = {"image": threshold, "pixel": pixel, "from": source}
        if "mask" in processed:
            result["mask"] = processed["mask"].cpu().numpy()
        if "explanation" in model_outputs:  # batched runs hand postprocess a list of one
            explanation = model_outputs["explanation"]
            result["explanation"] = explanation[0] if isinstance(explanation, list) else explanation
        return result

    def _calibration(self):
        """`model.calibration` (calibration.json), else the bank's record of it; warns if the bank changed since."""
        calibration = getattr(self.model, "calibration", None)
        calibration = calibration or (getattr(self.model, "memory_bank_metadata", None) or {}).get("calibration")
        made_for = (calibration or {}).get("bank") or {}
        made = (made_for.get("image_entries"), made_for.get("patch_entries"))
        now = (self.model.config.image_bank_size, self.model.config.patch_bank_size)
        if made_for and made != now:
            warnings.warn(
                f"The calibration was made with a memory bank of {made[0]} image / {made[1]} patch entries but the "
                f"model now has {now[0]} / {now[1]}: its thresholds may no longer give the promised false-positive "
                "rate. Re-run `mrad calibrate` with it.",
                stacklevel=2,
            )
        return calibration
