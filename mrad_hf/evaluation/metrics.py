# SPDX-License-Identifier: Apache-2.0
"""Anomaly-detection metrics of the MRAD evaluation protocol (one implementation for the package).

MRAD (arXiv 2602.00522, Sec. 4.1) reports, per category and then averaged over categories:

* image level: AUROC and AP of the image scores (F1-max is offered as well);
* pixel level: AUROC and AUPRO of the anomaly maps (AP and F1-max are offered as well).

Pixel metrics are computed on the maps at the evaluation size (518 x 518 in the paper) against
ground-truth masks resized to that size (bilinear, then ``> 0.5``). That resizing belongs to the
evaluation runner; every function here takes maps and binary masks of the same size.

AUPRO (area under the per-region-overlap curve up to a false-positive-rate limit) has two
incompatible definitions in the literature, both available through :func:`aupro`:

``protocol="reference"`` (default, the numbers the paper reports)
    The cflow-ad routine that AnomalyCLIP, APRIL-GAN, MuSc, Bayes-PFL and MRAD's
    ``utils/metrics.py:cal_pro_score`` share. Thresholds are
    ``np.arange(min, max, (max - min) / 200)`` over all maps (so about 200 of them, the maximum
    excluded); a pixel is positive when ``map > threshold``; the ground-truth regions are the
    8-connected components of each image's mask; PRO is the *mean over regions* of the fraction of
    the region that is positive; FPR is over all normal pixels. Points with ``FPR < 0.3`` are
    kept, their FPRs are min-max rescaled to [0, 1], and :func:`sklearn.metrics.auc` integrates
    PRO over them. This module computes exactly that, vectorised: the components are labelled
    once, every pixel's threshold bin is found with :func:`numpy.searchsorted`, and one
    :func:`numpy.bincount` over ``(region, bin)`` gives the counts at every threshold at once.
    It matches a literal loop implementation to ~1e-15. As in the reference under NumPy >= 2,
    maps are compared with the float64 thresholds ``np.arange`` returns, in float64.

``protocol="anomalib"``
    anomalib's ``AUPRO`` (the MVTec AD ``compute_pro`` definition): the PRO curve at *every*
    distinct score (positive when ``map >= t``), prefixed by (0, 0), integrated with the
    trapezoid rule up to the FPR limit (the point at the limit is linearly interpolated) and
    divided by the limit. See :func:`aupro` for how closely it matches anomalib's code.

The two protocols are not interchangeable: the reference one rescales the FPR axis, so it is
neither the anomalib value nor bounded by it. Report which one you used.

References:
    * MRAD: "Zero-Shot Anomaly Detection with Memory-Driven Retrieval", arXiv 2602.00522, Sec. 4.1.
    * cflow-ad (Gudovskiy et al., WACV 2022), ``train.py``: the AUPRO routine reproduced here.
    * Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021: the PRO definition.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "AUPRO_PROTOCOLS",
    "METRIC_KEYS",
    "AuproProtocol",
    "aupro",
    "compute_all_metrics",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
]

AuproProtocol = Literal["reference", "anomalib"]
AUPRO_PROTOCOLS: tuple[str, ...] = ("reference", "anomalib")

#: Keys of :func:`compute_all_metrics`, in order.
METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)

# 8-connectivity inside one image, no connection across images of a (N, H, W) stack. For 2-D
# masks this is skimage.measure.label's default (connectivity = ndim).
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True

# Pixels processed per chunk by the vectorised AUPRO (bounds the temporary int64 arrays).
_CHUNK_PIXELS = 1 << 22

_F1_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_binary(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    """Returns ``values`` as a bool array, rejecting anything but {0, 1} / {False, True}."""
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {array.dtype}.")
    is_zero = array == 0
    if not np.all(is_zero | (array == 1)):
        raise ValueError(
            f"{name} must be binary (0/1 or bool); found other values. Threshold them first, "
            "e.g. `mask > 0.5` as the reference protocol does after the bilinear resize."
        )
    return ~is_zero


def _as_finite_scores(values: ArrayLike, name: str) -> NDArray[np.floating]:
    """Returns ``values`` as a floating array (native float dtype kept), rejecting NaN/inf."""
    array = np.asarray(values)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.floating):
        if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number)):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
        array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"{name} contains {n_bad} NaN or infinite value(s). Fix the model output (or replace "
            "them explicitly, e.g. np.nan_to_num) before computing metrics."
        )
    return array


def _labels_and_scores(
    labels: ArrayLike, scores: ArrayLike, what: str
) -> tuple[NDArray[np.bool_], NDArray[np.floating]]:
    """Validates a (labels, scores) pair of equal shape and flattens both."""
    labels_array = np.asarray(labels)
    scores_array = np.asarray(scores)
    if labels_array.shape != scores_array.shape:
        raise ValueError(
            f"{what}: labels have shape {labels_array.shape} but scores have shape "
            f"{scores_array.shape}; they must match element for element."
        )
    if labels_array.size == 0:
        raise ValueError(f"{what}: got empty inputs.")
    binary = _as_binary(labels_array, f"{what} labels").ravel()
    values = _as_finite_scores(scores_array, f"{what} scores").ravel()
    return binary, values


def _require_both_classes(binary: NDArray[np.bool_], what: str) -> None:
    """Raises a ValueError when ``binary`` does not contain both classes."""
    n_positive = int(np.count_nonzero(binary))
    if n_positive == 0:
        raise ValueError(
            f"{what} is undefined without anomalous samples (every label is 0). Evaluate it on a "
            "set that contains anomalies, or use compute_all_metrics, which reports NaN."
        )
    if n_positive == binary.size:
        raise ValueError(
            f"{what} is undefined without normal samples (every label is 1). Evaluate it on a "
            "set that contains normal samples, or use compute_all_metrics, which reports NaN."
        )


def _masks_and_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.floating]]:
    """Validates masks and maps and returns them as ``(N, H, W)`` bool / float arrays.

    Accepts ``(H, W)``, ``(N, H, W)`` and ``(N, 1, H, W)`` inputs.
    """
    mask_array = np.asarray(masks)
    map_array = np.asarray(maps)
    if mask_array.shape != map_array.shape:
        raise ValueError(
            f"masks have shape {mask_array.shape} but maps have shape {map_array.shape}. Resize "
            "the masks to the map size first (reference protocol: bilinear to 518, then > 0.5)."
        )
    if mask_array.ndim == 4 and mask_array.shape[1] == 1:
        mask_array, map_array = mask_array[:, 0], map_array[:, 0]
    elif mask_array.ndim == 2:
        mask_array, map_array = mask_array[None], map_array[None]
    if mask_array.ndim != 3:
        raise ValueError(
            f"masks and maps must have shape (H, W), (N, H, W) or (N, 1, H, W); got {np.asarray(masks).shape}."
        )
    if mask_array.size == 0:
        raise ValueError("masks and maps are empty.")
    return _as_binary(mask_array, "masks"), _as_finite_scores(map_array, "maps")


def _require_pixel_classes(masks: NDArray[np.bool_]) -> None:
    """Raises a ValueError when the masks lack anomalous or normal pixels."""
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0:
        raise ValueError(
            "No anomalous pixel in any mask: pixel metrics need at least one defect. Include "
            "anomalous images (or use compute_all_metrics, which reports NaN for this case)."
        )
    if n_anomalous == masks.size:
        raise ValueError(
            "Every pixel of every mask is anomalous: pixel metrics need normal pixels too. "
            "Include normal images or check that the masks are not inverted."
        )


# --------------------------------------------------------------------------------------------
# Image-level (scikit-learn) and flattened pixel-level metrics (one shared sort)
# --------------------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (``sklearn.metrics.roc_auc_score``).

    Args:
        labels: Image labels, 1 (or True) = anomalous, 0 = normal.
        scores: Image anomaly scores, higher = more anomalous; same shape as ``labels``.

    Returns:
        The AUROC in [0, 1].

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN/inf scores or a single class.
    """
    binary, values = _labels_and_scores(labels, scores, "image_auroc")
    _require_both_classes(binary, "image_auroc")
    return float(roc_auc_score(binary, values))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level average precision (``sklearn.metrics.average_precision_score``).

    Args:
        labels: Image labels, 1 (or True) = anomalous, 0 = normal.
        scores: Image anomaly scores, higher = more anomalous; same shape as ``labels``.

    Returns:
        The AP in [0, 1].

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN/inf scores or a single class.
    """
    binary, values = _labels_and_scores(labels, scores, "image_ap")
    _require_both_classes(binary, "image_ap")
    return float(average_precision_score(binary, values))


def _f1_max_from_curve(precision: NDArray[np.floating], recall: NDArray[np.floating]) -> float:
    """Maximum of ``2PR / (P + R + 1e-8)`` over the finite points of a precision-recall curve."""
    f1 = 2.0 * precision * recall / (precision + recall + _F1_EPS)
    return float(np.max(f1[np.isfinite(f1)]))


def _ap_from_curve(precision: NDArray[np.floating], recall: NDArray[np.floating]) -> float:
    """Average precision of a curve: the sum scikit-learn's ``average_precision_score`` uses."""
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Maximum F1 over all thresholds (image level, or pixel level on masks and maps).

    F1 is ``2PR / (P + R + 1e-8)`` along ``sklearn.metrics.precision_recall_curve``; the maximum
    is taken over finite values. Inputs of any (equal) shape are flattened, so this works both
    for image labels/scores and for masks/maps.

    Args:
        labels: Binary ground truth, 1 (or True) = anomalous.
        scores: Anomaly scores of the same shape, higher = more anomalous.

    Returns:
        The F1-max in [0, 1].

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN/inf scores or a single class.
    """
    binary, values = _labels_and_scores(labels, scores, "f1_max")
    _require_both_classes(binary, "f1_max")
    precision, recall, _ = precision_recall_curve(binary, values)
    return _f1_max_from_curve(precision, recall)


def _distinct_scores(
    scores: NDArray[np.floating],
) -> tuple[NDArray[np.floating], NDArray[np.int64]]:
    """Distinct values of ``scores`` (ascending) and how many scores are ``>=`` each of them.

    Uses a plain (SIMD) sort rather than an argsort, which is several times faster on the
    ~27 M pixels of a category.
    """
    ascending = np.sort(scores, axis=None)
    starts = np.flatnonzero(np.append(True, ascending[1:] != ascending[:-1]))
    return ascending[starts], ascending.size - starts


def _binary_curve_counts(
    positive: NDArray[np.bool_], scores: NDArray[np.floating]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """False- and true-positive counts at every distinct score, highest score first.

    The same counts as scikit-learn's ``_binary_clf_curve`` (positive when ``score >= t``), so
    the pixel AUROC, AP and F1-max of millions of pixels can share one pass.
    """
    distinct, at_or_above = _distinct_scores(scores)
    positive_scores = np.sort(scores[positive])
    true_positives = positive_scores.size - np.searchsorted(positive_scores, distinct, side="left")
    false_positives = at_or_above - true_positives
    return false_positives[::-1], true_positives[::-1]


def _auroc_from_counts(false_positives: NDArray[np.int64], true_positives: NDArray[np.int64]) -> float:
    """Trapezoid area under the ROC curve built from cumulative counts (sklearn's value)."""
    fpr = np.concatenate(([0.0], false_positives / false_positives[-1]))
    tpr = np.concatenate(([0.0], true_positives / true_positives[-1]))
    return float(np.trapezoid(tpr, fpr))


def _precision_recall_from_counts(
    false_positives: NDArray[np.int64], true_positives: NDArray[np.int64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Precision and recall arrays laid out as ``sklearn.metrics.precision_recall_curve``'s."""
    predicted_positive = true_positives + false_positives
    precision = true_positives / predicted_positive
    recall = true_positives / true_positives[-1]
    return np.append(precision[::-1], 1.0), np.append(recall[::-1], 0.0)


def _flat_pixels(masks: ArrayLike, maps: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.floating]]:
    """Validated, flattened masks and maps with both pixel classes present."""
    mask_array, map_array = _masks_and_maps(masks, maps)
    _require_pixel_classes(mask_array)
    return mask_array.ravel(), map_array.ravel()


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC over all pixels of all images (flattened).

    Equal to ``sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel())`` (to rounding), but
    computed from one sort shared with the other pixel metrics.

    Args:
        masks: Binary ground-truth masks, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``.
        maps: Anomaly maps of the same shape.

    Returns:
        The pixel AUROC in [0, 1].

    Raises:
        ValueError: On shape mismatch, non-binary masks, NaN/inf maps, or masks without
            anomalous (or without normal) pixels.
    """
    return _auroc_from_counts(*_binary_curve_counts(*_flat_pixels(masks, maps)))


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level average precision over all pixels of all images (flattened).

    Equal to ``sklearn.metrics.average_precision_score`` on the flattened arrays.

    Args:
        masks: Binary ground-truth masks, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``.
        maps: Anomaly maps of the same shape.

    Returns:
        The pixel AP in [0, 1].

    Raises:
        ValueError: As :func:`pixel_auroc`.
    """
    counts = _binary_curve_counts(*_flat_pixels(masks, maps))
    return _ap_from_curve(*_precision_recall_from_counts(*counts))


def pixel_f1_max(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level F1-max: :func:`f1_max` on the flattened masks and maps.

    Args:
        masks: Binary ground-truth masks, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``.
        maps: Anomaly maps of the same shape.

    Returns:
        The pixel F1-max in [0, 1].

    Raises:
        ValueError: As :func:`pixel_auroc`.
    """
    counts = _binary_curve_counts(*_flat_pixels(masks, maps))
    return _f1_max_from_curve(*_precision_recall_from_counts(*counts))


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


def _label_regions(masks: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """Labels the 8-connected anomalous regions of each image with globally unique ids.

    Args:
        masks: ``(N, H, W)`` bool masks.

    Returns:
        ``(region_ids, n_regions)``: an int32 array like ``masks`` holding 0 on normal pixels and
        1..n_regions on anomalous ones (regions never span two images).
    """
    region_ids, n_regions = ndimage.label(masks, structure=_PER_IMAGE_8_CONNECTIVITY, output=np.int32)
    return region_ids, int(n_regions)


def _image_chunks(n_images: int, pixels_per_image: int) -> list[slice]:
    """Splits ``range(n_images)`` into slices of about ``_CHUNK_PIXELS`` pixels each."""
    step = max(1, _CHUNK_PIXELS // max(1, pixels_per_image))
    return [slice(start, min(start + step, n_images)) for start in range(0, n_images, step)]


def _reference_thresholds(maps: NDArray[np.floating], num_thresholds: int) -> NDArray[np.floating]:
    """The cflow-ad thresholds ``np.arange(min, max, (max - min) / num_thresholds)``.

    Computed with exactly the same scalar arithmetic as the reference (in the maps' dtype), so
    that the thresholds, and hence every comparison, are bit-identical.
    """
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / num_thresholds
    if not delta > 0:
        return np.empty(0, dtype=np.float64)
    return np.arange(min_th, max_th, delta)


def _reference_counts(
    region_ids: NDArray[np.int32],
    n_regions: int,
    maps: NDArray[np.floating],
    thresholds: NDArray[np.floating],
) -> NDArray[np.int64]:
    """Counts, per region and threshold, the pixels with ``map > threshold``.

    A pixel with score ``s`` is above ``thresholds[k]`` iff ``k < searchsorted(thresholds, s,
    side="left")`` (thresholds are non-decreasing), so a histogram of that bin index per region,
    accumulated from the top, gives all counts at once.

    Returns:
        ``(n_regions + 1, T)`` int64 counts; row 0 is the normal pixels (false positives).
    """
    n_bins = thresholds.size + 1
    histogram = np.zeros((n_regions + 1) * n_bins, dtype=np.int64)
    for chunk in _image_chunks(maps.shape[0], maps[0].size):
        bins = np.searchsorted(thresholds, maps[chunk].ravel(), side="left")
        flat_index = region_ids[chunk].ravel().astype(np.int64) * n_bins + bins
        histogram += np.bincount(flat_index, minlength=histogram.size)
    per_region = histogram.reshape(n_regions + 1, n_bins)
    # above[:, j] = number of pixels whose bin index is >= j; threshold k needs bin index > k.
    above = np.cumsum(per_region[:, ::-1], axis=1)[:, ::-1]
    return above[:, 1:]


def _reference_curve(
    masks: NDArray[np.bool_], maps: NDArray[np.floating], num_thresholds: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.floating]]:
    """(fprs, pros, thresholds) of the cflow-ad routine, before the FPR cut."""
    thresholds = _reference_thresholds(maps, num_thresholds)
    if thresholds.size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty, thresholds
    region_ids, n_regions = _label_regions(masks)
    counts = _reference_counts(region_ids, n_regions, maps, thresholds)
    areas = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
    fprs = counts[0] / areas[0]
    pros = np.mean(counts[1:] / areas[1:, None], axis=0)
    return fprs, pros, thresholds


def _reference_aupro(
    masks: NDArray[np.bool_], maps: NDArray[np.floating], num_thresholds: int, fpr_limit: float
) -> float:
    """The cflow-ad AUPRO (see the module docstring), with its degenerate cases made explicit."""
    fprs, pros, thresholds = _reference_curve(masks, maps, num_thresholds)
    if thresholds.size == 0:
        warnings.warn(
            "aupro(protocol='reference'): the maps are constant, so there is no threshold to "
            "sweep (the reference code fails here); returning NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    kept = fprs < fpr_limit
    if not np.any(kept):
        warnings.warn(
            f"aupro(protocol='reference'): no threshold reaches FPR < {fpr_limit}; returning 0.0 "
            "as AnomalyCLIP/MRAD's cal_pro_score does.",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0.0
    kept_fprs = fprs[kept]
    fpr_range = kept_fprs.max() - kept_fprs.min()
    if kept_fprs.size < 2 or fpr_range == 0:
        warnings.warn(
            f"aupro(protocol='reference'): the thresholds with FPR < {fpr_limit} span no FPR "
            "range (e.g. a map that perfectly separates the masks), so the min-max rescaling is "
            "0/0 and the reference value is undefined; returning NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    rescaled = (kept_fprs - kept_fprs.min()) / fpr_range
    return float(auc(rescaled, pros[kept]))


def _exact_curve(
    masks: NDArray[np.bool_], maps: NDArray[np.floating], fpr_limit: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.floating]]:
    """PRO curve at every distinct score (``map >= t``), from (0, 0) to just past ``fpr_limit``.

    Only the pixels at or above a cut score are sorted: the cut is a normal-pixel score at which
    the FPR already exceeds the limit, so the returned curve always has at least one point past
    the limit (or ends at FPR = 1).

    Returns:
        ``(fprs, pros, thresholds)``; the first point is (0, 0) with threshold ``+inf``.
    """
    region_ids, n_regions = _label_regions(masks)
    areas = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
    n_normal = int(areas[0])
    scores = maps.ravel()
    regions = region_ids.ravel()

    if fpr_limit < 1.0:
        # At the (k+1)-th largest normal score, at least floor(limit * n) + 2 normal pixels are
        # positive, which is more than limit * n even after rounding.
        k = min(n_normal - 1, math.floor(fpr_limit * n_normal) + 1)
        normal_scores = scores[regions == 0]
        cut = np.partition(normal_scores, n_normal - 1 - k)[n_normal - 1 - k]
        selected = scores >= cut
        scores, regions = scores[selected], regions[selected]

    distinct, at_or_above = _distinct_scores(scores)
    is_anomalous = regions > 0
    # Index of each anomalous pixel's score among the distinct scores, then per-score sums.
    score_index = np.searchsorted(distinct, scores[is_anomalous], side="left")
    anomalous_regions = regions[is_anomalous]
    pro_weight = np.bincount(
        score_index, weights=1.0 / (n_regions * areas[anomalous_regions]), minlength=distinct.size
    )
    anomalous_count = np.bincount(score_index, minlength=distinct.size)
    # Highest score first: cumulate from the top.
    pros = np.cumsum(pro_weight[::-1])
    false_positives = at_or_above[::-1] - np.cumsum(anomalous_count[::-1])
    fprs = np.concatenate(([0.0], false_positives / n_normal))
    pros = np.concatenate(([0.0], pros))
    thresholds = np.concatenate(([np.inf], distinct[::-1]))
    return fprs, np.minimum(pros, 1.0), thresholds


def _area_up_to(fprs: NDArray[np.float64], pros: NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under (fprs, pros) on [0, limit], interpolating the point at ``limit``."""
    last_inside = int(np.searchsorted(fprs, limit, side="right")) - 1
    area = float(np.trapezoid(pros[: last_inside + 1], fprs[: last_inside + 1]))
    if last_inside + 1 < fprs.size and fprs[last_inside] < limit:
        x0, x1 = fprs[last_inside], fprs[last_inside + 1]
        y0, y1 = pros[last_inside], pros[last_inside + 1]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def _anomalib_aupro(masks: NDArray[np.bool_], maps: NDArray[np.floating], fpr_limit: float) -> float:
    """Exact anomalib/MVTec-style AUPRO: area up to ``fpr_limit`` divided by ``fpr_limit``."""
    fprs, pros, _ = _exact_curve(masks, maps, fpr_limit)
    return _area_up_to(fprs, pros, fpr_limit) / fpr_limit


def _check_aupro_options(protocol: str, num_thresholds: int, fpr_limit: float) -> None:
    """Validates the AUPRO keyword options."""
    if protocol not in AUPRO_PROTOCOLS:
        raise ValueError(
            f"Unknown AUPRO protocol {protocol!r}; use 'reference' (cflow-ad, the paper's "
            "numbers) or 'anomalib' (every threshold, area divided by the FPR limit)."
        )
    is_integer = isinstance(num_thresholds, int | np.integer)
    is_integer = is_integer and not isinstance(num_thresholds, bool)
    if not is_integer or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive integer, got {num_thresholds!r}.")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}.")


def pro_curve(
    masks: ArrayLike,
    maps: ArrayLike,
    *,
    protocol: AuproProtocol = "reference",
    num_thresholds: int = 200,
    fpr_limit: float = 0.3,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.floating]]:
    """The per-region-overlap curve behind :func:`aupro`, for plots and checks.

    Args:
        masks: Binary ground-truth masks, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``.
        maps: Anomaly maps of the same shape.
        protocol: ``"reference"``: all ~``num_thresholds`` cflow-ad points (``map > t``), with
            raw, not yet cut or rescaled FPRs. ``"anomalib"``: one point per distinct score
            (``map >= t``) from (0, 0) up to the first point past ``fpr_limit``.
        num_thresholds: Number of threshold steps of the reference protocol.
        fpr_limit: FPR limit (only used to shorten the ``"anomalib"`` curve).

    Returns:
        ``(fprs, pros, thresholds)`` as float arrays of equal length.

    Raises:
        ValueError: As :func:`aupro`.
    """
    _check_aupro_options(protocol, num_thresholds, fpr_limit)
    mask_array, map_array = _masks_and_maps(masks, maps)
    _require_pixel_classes(mask_array)
    if protocol == "reference":
        return _reference_curve(mask_array, map_array, int(num_thresholds))
    return _exact_curve(mask_array, map_array, fpr_limit)


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    *,
    protocol: AuproProtocol = "reference",
    num_thresholds: int = 200,
    fpr_limit: float = 0.3,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to an FPR limit.

    Regions are the 8-connected components of each image's mask; PRO at a threshold is the mean,
    over all regions of all images, of the fraction of the region detected (each region counts
    once whatever its size); FPR is the fraction of all normal pixels that are detected.

    ``protocol="reference"`` is the cflow-ad routine used by MRAD/AnomalyCLIP (module docstring):
    ``np.arange(min, max, (max - min) / num_thresholds)`` thresholds, ``map > t``, points with
    ``FPR < fpr_limit`` kept, FPRs min-max rescaled, ``sklearn.metrics.auc``. Because the
    thresholds are evenly spaced in score, it is invariant to positive affine changes of the
    maps but not to other monotone transforms. Its degenerate cases follow the reference: no
    threshold under the limit gives 0.0 (AnomalyCLIP's guard); constant maps, or kept points
    that span no FPR range (the reference divides 0 by 0), give NaN. Each case warns.

    ``protocol="anomalib"`` integrates the exact PRO curve (every distinct score is a threshold,
    ``map >= t``, starting at (0, 0)) with the trapezoid rule up to ``fpr_limit``, linearly
    interpolating the point at the limit, and divides by ``fpr_limit``. It is invariant to any
    strictly increasing transform of the maps. ``num_thresholds`` is not used. This is what
    anomalib 2.7's ``AUPRO.compute_pro`` does (one global sort, cumulative FP and per-region
    overlap, duplicate thresholds dropped, (0, 0) prepended, interpolation at the limit, area
    divided by the last FPR); on 30 random cases (ties, limits 0.05 to 1) this function agreed
    with it to 1e-7, the difference being anomalib's float32 accumulation (anomalib is not a
    dependency; that check was run once, outside the test suite). Older anomalib releases
    (torchmetrics ROC per region, resampled on a common index grid, optional binning and a
    sigmoid for maps outside [0, 1]) only approximate this curve and can differ in the last
    digits. anomalib returns 0 where this function raises (no normal or anomalous pixel).

    Args:
        masks: Binary ground-truth masks, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``, at the
            same size as the maps (resize them first; the paper uses 518 x 518).
        maps: Anomaly maps of the same shape, higher = more anomalous. Their dtype is kept so the
            reference thresholds are bit-identical to the reference code's.
        protocol: ``"reference"`` (default, paper numbers) or ``"anomalib"``.
        num_thresholds: Number of evenly spaced threshold steps (``max_step``) of the reference
            protocol.
        fpr_limit: Integrate up to this false-positive rate, in (0, 1].

    Returns:
        The AUPRO, in [0, 1] (NaN or 0.0 only in the degenerate reference cases above).

    Raises:
        ValueError: On mismatched shapes, non-binary masks, NaN/inf maps, masks without any
            anomalous pixel or without any normal pixel, or invalid options.
    """
    _check_aupro_options(protocol, num_thresholds, fpr_limit)
    mask_array, map_array = _masks_and_maps(masks, maps)
    _require_pixel_classes(mask_array)
    if protocol == "reference":
        return _reference_aupro(mask_array, map_array, int(num_thresholds), float(fpr_limit))
    return _anomalib_aupro(mask_array, map_array, float(fpr_limit))


# --------------------------------------------------------------------------------------------
# All metrics of one category
# --------------------------------------------------------------------------------------------


def _image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """Image AUROC, AP and F1-max, or NaN (with a warning) when only one class is present."""
    binary, values = _labels_and_scores(labels, scores, "image metrics")
    n_positive = int(np.count_nonzero(binary))
    if n_positive in (0, binary.size):
        present = "anomalous" if n_positive else "normal"
        warnings.warn(
            f"Image metrics are undefined: every image is {present}. Reporting NaN for "
            "image_auroc, image_ap and image_f1_max.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {"image_auroc": math.nan, "image_ap": math.nan, "image_f1_max": math.nan}
    precision, recall, _ = precision_recall_curve(binary, values)
    return {
        "image_auroc": float(roc_auc_score(binary, values)),
        "image_ap": _ap_from_curve(precision, recall),
        "image_f1_max": _f1_max_from_curve(precision, recall),
    }


def _pixel_metrics(masks: ArrayLike, maps: ArrayLike, aupro_protocol: str) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO, or NaN (with a warning) without both pixel classes."""
    mask_array, map_array = _masks_and_maps(masks, maps)
    n_anomalous = int(np.count_nonzero(mask_array))
    if n_anomalous in (0, mask_array.size):
        reason = "no mask has an anomalous pixel" if n_anomalous == 0 else "every mask pixel is anomalous"
        warnings.warn(
            f"Pixel metrics are undefined: {reason}. Reporting NaN for pixel_auroc, pixel_ap, pixel_f1_max and aupro.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {key: math.nan for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")}
    counts = _binary_curve_counts(mask_array.ravel(), map_array.ravel())
    precision, recall = _precision_recall_from_counts(*counts)
    return {
        "pixel_auroc": _auroc_from_counts(*counts),
        "pixel_ap": _ap_from_curve(precision, recall),
        "pixel_f1_max": _f1_max_from_curve(precision, recall),
        "aupro": aupro(mask_array, map_array, protocol=aupro_protocol),  # type: ignore[arg-type]
    }


def compute_all_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    *,
    aupro_protocol: AuproProtocol = "reference",
    pixel_images: ArrayLike | None = None,
) -> dict[str, float]:
    """All metrics of one category: image AUROC/AP/F1-max and, with masks, the pixel metrics.

    ``pixel_images`` (``(N,)`` bool) selects the images whose masks are known: the others (anomalous images
    without a ground-truth mask) are left out of the pixel metrics instead of counting as all-normal pixels,
    which would bias pixel AUROC and AP. Image metrics always use every image.

    Undefined metrics are reported as NaN with a ``RuntimeWarning`` instead of raising, so that
    a whole benchmark can run: image metrics when every image has the same label, pixel metrics
    (``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``, ``aupro``) when no mask has an anomalous
    pixel (or no pixel is normal). Average over categories with ``np.nanmean`` only if that is
    what you mean to report.

    Args:
        labels: ``(N,)`` image labels, 1 (or True) = anomalous.
        scores: ``(N,)`` image anomaly scores.
        masks: Optional binary masks ``(N, H, W)`` (or ``(N, 1, H, W)``) at the map size.
        maps: Anomaly maps of the same shape as ``masks``; required when ``masks`` is given.
        aupro_protocol: ``"reference"`` (cflow-ad, default) or ``"anomalib"``; see :func:`aupro`.
        pixel_images: Optional ``(N,)`` bool: which images enter the pixel metrics (default: all).

    Returns:
        A dict with the keys of :data:`METRIC_KEYS` (the four pixel keys only when masks are
        given), values as Python floats in [0, 1] or NaN.

    Raises:
        ValueError: On invalid inputs (shapes, non-binary labels or masks, NaN/inf scores or
            maps, one of ``masks``/``maps`` missing, unknown protocol).
    """
    if (masks is None) != (maps is None):
        raise ValueError("Pass both masks and maps for pixel metrics, or neither.")
    _check_aupro_options(aupro_protocol, 200, 0.3)
    results: dict[str, float] = dict(_image_metrics(labels, scores))
    if masks is not None and maps is not None:
        if pixel_images is not None:
            selected = np.asarray(pixel_images)
            if selected.dtype != np.bool_ or selected.shape != (len(masks),):
                raise ValueError(
                    f"pixel_images must be a bool array of shape ({len(masks)},), got {selected.dtype} {selected.shape}."
                )
            masks, maps = np.asarray(masks)[selected], np.asarray(maps)[selected]
        results.update(_pixel_metrics(masks, maps, aupro_protocol))
    return {key: results[key] for key in METRIC_KEYS if key in results}
