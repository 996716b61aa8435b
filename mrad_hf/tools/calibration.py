# SPDX-License-Identifier: Apache-2.0
"""Calibrated decisions: image and pixel thresholds for a target false-positive rate, from known-good images.

MRAD's scores are retrieval probabilities, not calibrated ones: which score separates good from bad parts
depends on the bank and the product. A few known-good images of the product fix that:

* **Image threshold (split-conformal).** Score n good images, sort the scores s_(1) <= ... <= s_(n) and take
  t = s_(k) with k = ceil((n + 1)(1 - alpha)), alpha the target false-positive rate. An image is anomalous
  when its score > t. For a new good image exchangeable with the calibration images (same product, same
  camera), P(score > t) <= alpha, averaged over calibration sets; with continuous scores it is also
  >= alpha - 1 / (n + 1). It needs k <= n, i.e. n >= (1 - alpha) / alpha good images (9 for alpha = 0.1,
  19 for 0.05, 99 for 0.01); `ConformalError` says so otherwise. How many images make the threshold stable
  in practice is measured in docs/calibration.md.
* **Pixel threshold.** The same order statistic over all pixels of the good images' anomaly maps (at the
  network's input size), for a pixel false-positive rate `pixel_fpr`. Pixels of one image are correlated,
  so this is the empirical (1 - pixel_fpr) quantile of normal pixels, not a guarantee.
* **Known defects** (optional) do not move the thresholds; they report the recall the thresholds give
  (share of defect images above the image threshold, share of defect-mask pixels above the pixel one).

`calibrate` returns a JSON-able dict; `apply_calibration` stores it on `model.calibration`, so it
travels with `save_pretrained` (as `calibration.json`), and optionally in a bank's metadata. The anomaly-detection pipeline then
returns `is_anomalous` and a binary `mask` with every score (explicit `threshold=` arguments still win).
A calibration records the bank it was made with; the pipeline warns when the model's bank changed since.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..models.mrad.image_processing_mrad import MRADImageProcessor

__all__ = [
    "ConformalError",
    "conformal_threshold",
    "minimum_normal_images",
    "score_images",
    "calibrate",
    "apply_calibration",
    "resampling_study",
]


class ConformalError(ValueError):
    """Too few calibration scores for the requested false-positive rate."""


def minimum_normal_images(target_fpr: float) -> int:
    """Smallest n for which the conformal threshold at `target_fpr` exists: (n + 1)(1 - alpha) <= n."""
    _check_rate(target_fpr, "target_fpr")
    return math.ceil((1.0 - target_fpr) / target_fpr - 1e-12)


def _check_rate(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} is a false-positive rate in (0, 1), e.g. 0.05; got {value}.")


def conformal_threshold(scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """The k-th smallest score, k = ceil((n + 1)(1 - target_fpr)); decide anomalous when score > threshold."""
    _check_rate(target_fpr, "target_fpr")
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise ValueError("Calibration scores contain NaN or infinite values; check the images and the memory bank.")
    n = values.size
    k = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)
    if k > n:
        raise ConformalError(
            f"A false-positive rate of {target_fpr} needs at least {minimum_normal_images(target_fpr)} known-good images "
            f"(conformal rank ceil((n+1)(1-alpha)) <= n); got {n}. Add good images or raise the target rate."
        )
    return float(np.partition(values, k - 1)[k - 1])


def score_images(
    model, images: Iterable[Any], *, masks: Iterable[Any] | None = None, batch_size: int = 8, progress: bool = True
):
    """Scores (n,) and anomaly maps (n, S, S) at the network input size, plus masks (n, S, S) bool when given.

    Images as the image processor takes them (paths, PIL images, arrays); scored by `evaluation.scoring.score_items`
    (the loop evaluation and prediction use), so the scores equal the pipeline's. An unusable image raises.
    """
    from ..evaluation.scoring import score_items

    images = list(images)
    masks = list(masks) if masks is not None else None
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(masks)} masks.")
    if not images:
        raise ValueError("No images to score: pass at least one image.")
    items = [
        {"image": image, **({"mask": masks[index]} if masks is not None else {})} for index, image in enumerate(images)
    ]
    results = score_items(model, items, batch_size=batch_size, on_error="fail", progress=progress)
    scores = np.array([result.score for result in results], dtype=np.float32)
    maps = torch.stack([result.anomaly_map for result in results]).numpy()
    side = maps.shape[-1]
    mask_out = (
        torch.stack([result.mask for result in results]).numpy() > 0.5
        if masks is not None
        else np.zeros((len(results), side, side), dtype=bool)
    )
    return scores, maps, mask_out


def _bank_signature(model) -> dict[str, Any]:
    metadata = model.memory_bank_metadata or {}
    return {
        "source": metadata.get("source"),
        "image_entries": int(model.config.image_bank_size),
        "patch_entries": int(model.config.patch_bank_size),
    }


def calibrate(
    model,
    normal_images: Sequence[Any],
    *,
    target_fpr: float = 0.05,
    pixel_fpr: float | None = None,
    defect_images: Sequence[Any] | None = None,
    defect_masks: Sequence[Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_error: str = "skip",
) -> dict[str, Any]:
    """Choose the image and pixel thresholds (estimators in the module docstring); returns a JSON-able dict.

    Every image is decoded first: an unreadable one is never counted as a good image. With `on_error="skip"` it is
    left out and listed under `skipped_files` (the minimum count applies to the readable ones); `"fail"` raises.

    Args:
        model: an `MRADForAnomalyDetection` with the bank it will be used with.
        normal_images: known-good images of the product (at least `minimum_normal_images(target_fpr)`).
        target_fpr: wanted share of good images flagged anomalous.
        pixel_fpr: wanted share of good pixels in the binary mask; default min(target_fpr, 0.01).
        defect_images, defect_masks: optional known defects, only to report the recall of the thresholds.
    """
    from ..data.reading import readable_items
    from ..memory.building import random_backbone

    pixel_fpr = min(target_fpr, 0.01) if pixel_fpr is None else pixel_fpr
    _check_rate(pixel_fpr, "pixel_fpr")
    processor = MRADImageProcessor.from_config(model.config)
    skipped: list[dict[str, str]] = []
    normal_images = readable_items(list(normal_images), processor.load, on_error=on_error, failures=skipped)
    if defect_images:
        defect_masks = list(defect_masks) if defect_masks is not None else [None] * len(defect_images)
        if len(defect_masks) != len(defect_images):
            raise ValueError(f"Got {len(defect_images)} defect images but {len(defect_masks)} masks.")
        pairs = list(zip(defect_images, defect_masks))
        pairs = readable_items(pairs, lambda pair: processor.load_pair(*pair), on_error=on_error, failures=skipped)
        defect_images, defect_masks = [image for image, _ in pairs], [mask for _, mask in pairs]
    needed = minimum_normal_images(target_fpr)
    if len(normal_images) < needed:
        conformal_threshold(np.zeros(len(normal_images)), target_fpr)  # raises with the actionable message
    scores, maps, _ = score_images(model, normal_images, batch_size=batch_size, progress=progress)
    image_threshold = conformal_threshold(scores, target_fpr)
    pixel_threshold = conformal_threshold(maps.ravel(), pixel_fpr)
    calibration = {
        "method": "split-conformal",
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "target_fpr": float(target_fpr),
        "pixel_fpr": float(pixel_fpr),
        "n_normal_images": int(len(scores)),
        "calibration_image_fpr": float((scores > image_threshold).mean()),
        "calibration_pixel_fpr": float((maps > pixel_threshold).mean()),
        "normal_score_range": [float(scores.min()), float(scores.max())],
        "decision": "anomalous when score > image_threshold; mask = anomaly_map > pixel_threshold",
        "bank": _bank_signature(model),
        "random_backbone": random_backbone(model),  # not None: thresholds of random features, for a pipeline check
        "defects": None,
        "skipped_files": skipped,
    }
    if defect_images:
        defect_scores, defect_maps, masks = score_images(
            model, defect_images, masks=defect_masks, batch_size=batch_size, progress=progress
        )
        defect_pixels = defect_maps[masks]
        calibration["defects"] = {
            "n_images": int(len(defect_scores)),
            "image_recall": float((defect_scores > image_threshold).mean()),
            "pixel_recall": float((defect_pixels > pixel_threshold).mean()) if defect_pixels.size else None,
        }
    return calibration


def apply_calibration(model, calibration: dict[str, Any], bank=None) -> None:
    """Store the calibration on `model.calibration` (saved by `save_pretrained` as `calibration.json`) and, if given, in
    a bank's metadata (sealed by its checksum on save)."""
    from ..models.mrad.memory_bank_mrad import validate_calibration

    for key in ("image_threshold", "pixel_threshold"):
        if not isinstance(calibration.get(key), (int, float)) or not math.isfinite(calibration[key]):
            raise ValueError(
                f"A calibration needs a finite '{key}'; got {calibration.get(key)!r}. Use mrad_hf.calibration.calibrate."
            )
    model.calibration = validate_calibration(calibration)
    if bank is not None:
        bank.metadata["calibration"] = dict(calibration)
        bank.seal()


def resampling_study(
    normal_scores: Sequence[float] | np.ndarray,
    sizes: Sequence[int],
    *,
    target_fpr: float,
    repeats: int = 1000,
    seed: int = 0,
) -> list[dict[str, float]]:
    """How many good images a stable threshold needs: for each n in `sizes`, draw n calibration scores without
    replacement from a pool of normal scores `repeats` times, set the conformal threshold, and measure the
    false-positive rate on the rest of the pool.

    Returns one row per n: mean and standard deviation of the threshold, mean achieved FPR, its 5 % / 95 %
    quantiles, and the share of draws whose achieved FPR exceeds twice the target.
    """
    pool = np.asarray(normal_scores, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        if n >= pool.size:
            raise ValueError(f"Calibration size {n} leaves no held-out scores in a pool of {pool.size}.")
        thresholds, rates = np.empty(repeats), np.empty(repeats)
        for r in range(repeats):
            chosen = np.zeros(pool.size, dtype=bool)
            chosen[rng.choice(pool.size, size=n, replace=False)] = True
            thresholds[r] = conformal_threshold(pool[chosen], target_fpr)
            rates[r] = float((pool[~chosen] > thresholds[r]).mean())
        rows.append(
            {
                "n": int(n),
                "threshold_mean": float(thresholds.mean()),
                "threshold_sd": float(thresholds.std()),
                "fpr_mean": float(rates.mean()),
                "fpr_p05": float(np.quantile(rates, 0.05)),
                "fpr_p95": float(np.quantile(rates, 0.95)),
                "share_above_twice_target": float((rates > 2 * target_fpr).mean()),
            }
        )
    return rows
