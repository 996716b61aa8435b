# SPDX-License-Identifier: Apache-2.0
"""MRAD as an anomalib model: `MRADAnomalib`, a zero-shot `AnomalibModule` around any `MRADForAnomalyDetection`.

Paper: MRAD, zero-shot anomaly detection by memory-driven retrieval (ICLR 2026, arXiv 2602.00522), Sec. 3.3
(inference). anomalib's AnomalyVFM integration is the model for this file: no training, `LearningType.ZERO_SHOT`,
the test / predict steps fill the batch with anomalib's own field names, and anomalib's datamodules, evaluator,
post-processor and visualiser do the rest.

Example:
    >>> from anomalib.data import Folder
    >>> from anomalib.engine import Engine
    >>> from mrad_hf.integrations.anomalib import MRADAnomalib
    >>> model = MRADAnomalib("mrad-hf/mrad-clip-visa")            # any variant: a folder, Hub id or loaded model
    >>> datamodule = Folder(name="parts", root="data/parts", normal_dir="good", abnormal_dir="defect",
    ...                     mask_dir="masks/defect")               # doctest: +SKIP
    >>> Engine().test(model=model, datamodule=datamodule)        # doctest: +SKIP
    >>> predictions = Engine().predict(model=model, datamodule=datamodule)  # doctest: +SKIP

Outputs per batch: `pred_score` (B,) the MRAD image score, `anomaly_map` (B, H, W) the smoothed map, and, when a
threshold is known (`threshold=` / `pixel_threshold=`, else the model's calibration from `mrad calibrate`),
`pred_label` (score > threshold) and `pred_mask` (map > pixel threshold), and anomalib's post-processor is set to
leave scores and maps in MRAD's scale. Without a threshold anomalib's `PostProcessor` decides: for a zero-shot model
`Engine.test` / `Engine.predict` validate first, then min-max normalise and threshold (adaptive F1) as for any model.

Pre-processing: anomalib hands float images in [0, 1]; the default pre-processor resizes them to the model's input
size with torchvision (bicubic, antialiased) and this module applies CLIP's normalisation, so anomalib's visualiser
sees the un-normalised image. This is close to, not bit-identical with, `MRADImageProcessor`'s PIL path (the
paper's numbers are reproduced with `mrad evaluate`); masks are resized by anomalib with nearest neighbours.

Needs `pip install "mrad-hf[anomalib]"` (anomalib pulls torchvision, lightning and timm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

try:
    from anomalib import LearningType
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
except ImportError as error:  # the optional extra is missing (or torchvision does not load beside this torch)
    raise ImportError(
        f'mrad_hf.integrations.anomalib needs anomalib: pip install "mrad-hf[anomalib]" (import failed: {error}). '
        "anomalib imports torchvision, which must be the build that matches your torch."
    ) from error

from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

__all__ = ["MRADAnomalib"]


def _load(model) -> MRADForAnomalyDetection:
    if isinstance(model, MRADForAnomalyDetection):
        return model.eval()
    from ..hub.api import load_model  # short names ("mrad-clip"), folders and Hub ids

    return load_model(model).eval()


class MRADAnomalib(AnomalibModule):
    """Zero-shot anomalib model scoring images with an MRAD model (MRAD-TF, MRAD-FT or MRAD-CLIP).

    Args:
        model: an `MRADForAnomalyDetection` with its memory bank, or a folder / Hub id / short name of one.
        threshold: image-score threshold for `pred_label` (default: the model's calibration, if any).
        pixel_threshold: map threshold for `pred_mask` (default: the calibrated one, else `threshold`).
        pre_processor, post_processor, evaluator, visualizer: as for every `AnomalibModule`.
    """

    def __init__(
        self,
        model: MRADForAnomalyDetection | str,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        mrad = _load(model)
        calibration = _calibration(mrad)
        if threshold is None and calibration is not None:
            threshold = float(calibration["image_threshold"])
            pixel_threshold = (
                float(calibration.get("pixel_threshold", threshold)) if pixel_threshold is None else pixel_threshold
            )
        # set before AnomalibModule.__init__, which calls configure_pre_processor / configure_post_processor
        self._mrad_image_size = int(mrad.config.image_size)
        self._mrad_threshold = None if threshold is None else float(threshold)
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model = mrad
        self.threshold = self._mrad_threshold
        self.pixel_threshold = self.threshold if pixel_threshold is None else float(pixel_threshold)
        processor = MRADImageProcessor.from_config(mrad.config)
        self.register_buffer(
            "image_mean", torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    # ------------------------------------------------------------------ anomalib hooks
    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the MRAD input size (bicubic, antialiased); CLIP normalisation happens in the step."""
        from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

        side = self._mrad_image_size or 518
        return PreProcessor(
            transform=Compose(
                [Resize(image_size or (side, side), interpolation=InterpolationMode.BICUBIC, antialias=True)]
            )
        )

    def configure_post_processor(self) -> PostProcessor:
        """anomalib's default; with an MRAD threshold it neither renormalises nor re-thresholds (scores stay MRAD's)."""
        if getattr(self, "_mrad_threshold", None) is not None:
            return PostProcessor(enable_normalization=False, enable_thresholding=False)
        return PostProcessor()

    @property
    def learning_type(self) -> LearningType:
        """MRAD needs no training on the target data: zero-shot."""
        return LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {}

    def configure_optimizers(self) -> None:
        return None

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score float images (B, 3, H, W) in [0, 1]: anomalib's fields, maps at the images' size."""
        height, width = images.shape[-2:]
        side = int(self.model.config.image_size)
        pixels = images.float()
        if (height, width) != (side, side):
            pixels = F.interpolate(
                pixels, size=(side, side), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        pixels = (pixels - self.image_mean.to(pixels.device)) / self.image_std.to(pixels.device)
        outputs = self.model(pixel_values=pixels.to(self.model.dtype))
        anomaly_map = outputs.anomaly_map.float()
        if anomaly_map.shape[-2:] != (height, width):
            anomaly_map = F.interpolate(
                anomaly_map[:, None], size=(height, width), mode="bilinear", align_corners=False
            )[:, 0]
        fields = {"pred_score": outputs.anomaly_score.float(), "anomaly_map": anomaly_map}
        if self.threshold is not None:
            fields["pred_label"] = fields["pred_score"] > self.threshold
            fields["pred_mask"] = anomaly_map > self.pixel_threshold
        return fields

    def validation_step(self, batch, *args, **kwargs):
        """Fill the batch with `pred_score`, `anomaly_map` (+ `pred_label`, `pred_mask` with a threshold)."""
        del args, kwargs
        return batch.update(**self.score(batch.image))

    def test_step(self, batch, *args, **kwargs):
        return self.validation_step(batch, *args, **kwargs)

    def predict_step(self, batch, *args, **kwargs):
        return self.validation_step(batch, *args, **kwargs)

    def training_step(self, batch, *args, **kwargs):
        del batch, args, kwargs
        raise RuntimeError(
            "MRADAnomalib is zero-shot: call Engine().test / Engine().predict, there is nothing to fit."
        )


def _calibration(model) -> dict[str, Any] | None:
    """`model.calibration` (its calibration.json), else the attached bank's record of it."""
    calibration = getattr(model, "calibration", None) or (getattr(model, "memory_bank_metadata", None) or {}).get(
        "calibration"
    )
    return calibration if isinstance(calibration, dict) and "image_threshold" in calibration else None
