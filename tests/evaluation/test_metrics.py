# SPDX-License-Identifier: Apache-2.0
"""Tests of mrad_hf.evaluation.metrics: values against scikit-learn, hand-computed cases, loop
oracles of both AUPRO protocols, edge cases and invariance properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from mrad_hf.evaluation import metrics
from mrad_hf.evaluation.metrics import (
    METRIC_KEYS,
    aupro,
    compute_all_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)

# --------------------------------------------------------------------------------------------
# Oracles: literal loop implementations
# --------------------------------------------------------------------------------------------


def _region_coordinates(masks: np.ndarray) -> list[list[np.ndarray]]:
    """Per image, the (row, col) coordinates of each skimage-labelled (8-connected) region."""
    return [[region.coords for region in measure.regionprops(measure.label(mask.astype(np.int64)))] for mask in masks]


def oracle_reference_aupro(
    masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3
) -> float:
    """The cflow-ad routine, one threshold at a time (regions labelled once; same result)."""
    masks = masks.astype(np.int64)
    regions = _region_coordinates(masks)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pro = []
        for image_index, image_regions in enumerate(regions):
            for coords in image_regions:
                detected = binary[image_index, coords[:, 0], coords[:, 1]].sum()
                pro.append(detected / len(coords))
        normal = 1 - masks
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    kept = fprs[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros[keep]))


def oracle_exact_aupro(masks: np.ndarray, amaps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Exact PRO curve (``map >= t`` at every distinct score), area to the limit / limit."""
    regions = _region_coordinates(masks)
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for th in np.unique(amaps)[::-1]:
        binary = amaps >= th
        overlaps = [
            binary[i, coords[:, 0], coords[:, 1]].mean()
            for i, image_regions in enumerate(regions)
            for coords in image_regions
        ]
        pros.append(float(np.mean(overlaps)))
        fprs.append((binary & normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x, y = list(fprs[inside]), list(pros[inside])
    if x[-1] < fpr_limit and inside.sum() < fprs.size:
        x.append(fpr_limit)
        y.append(float(np.interp(fpr_limit, fprs, pros)))
    return float(np.trapezoid(y, x)) / fpr_limit


# --------------------------------------------------------------------------------------------
# Random data
# --------------------------------------------------------------------------------------------


def random_masks(rng: np.random.Generator, n: int, h: int, w: int, density: float = 0.6) -> np.ndarray:
    """Blobby masks with several regions of different sizes; image 0 is always normal."""
    masks = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 1.5, 1.5)) > density
    masks[0] = False
    if not masks.any():
        masks[-1, 1:3, 1:4] = True
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, signal: float = 0.4) -> np.ndarray:
    """Smooth noisy maps, higher on the masks."""
    noise = rng.random(masks.shape)
    return ndimage.gaussian_filter(noise + signal * masks, (0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Image-level metrics and flattened pixel metrics against scikit-learn
# --------------------------------------------------------------------------------------------


def test_image_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + 0.5 * labels, 1)  # rounding creates ties
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected_f1 = 2 * precision * recall / (precision + recall + 1e-8)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == pytest.approx(np.max(expected_f1[np.isfinite(expected_f1)]), abs=1e-12)


def test_f1_max_hand_computed() -> None:
    # Best threshold keeps 0.9 and 0.8: precision 1, recall 2/3 -> F1 = 0.8.
    labels = [1, 1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1, 0.2]
    assert f1_max(labels, scores) == pytest.approx(0.8, abs=1e-7)


def test_pixel_metrics_match_sklearn_with_ties_and_float32() -> None:
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 5, 24, 20)
    maps = np.round(random_maps(rng, masks), 2).astype(np.float32)
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    precision, recall, _ = precision_recall_curve(flat_masks, flat_maps)
    expected_f1 = 2 * precision * recall / (precision + recall + 1e-8)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-12)
    best_f1 = np.max(expected_f1[np.isfinite(expected_f1)])
    assert pixel_f1_max(masks, maps) == pytest.approx(best_f1, abs=1e-12)


def test_flipped_scores_give_one_minus_auroc() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(40) < 0.5
    scores = rng.random(40) + 0.3 * labels
    assert image_auroc(labels, -scores) == pytest.approx(1 - image_auroc(labels, scores), abs=1e-12)
    masks = random_masks(rng, 3, 16, 16)
    maps = random_maps(rng, masks)
    assert pixel_auroc(masks, -maps) == pytest.approx(1 - pixel_auroc(masks, maps), abs=1e-12)
    # A flipped label convention must not silently pass: here the metric is clearly above 0.5.
    assert image_auroc(labels, scores) > 0.6 > image_auroc(~labels, scores)


def test_compute_all_metrics_matches_the_individual_functions() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 6, 20, 20)
    maps = random_maps(rng, masks)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    result = compute_all_metrics(labels, scores, masks, maps)
    assert tuple(result) == METRIC_KEYS
    assert result["image_auroc"] == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(image_ap(labels, scores), abs=1e-12)
    assert result["image_f1_max"] == pytest.approx(f1_max(labels, scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(pixel_ap(masks, maps), abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(pixel_f1_max(masks, maps), abs=1e-12)
    assert result["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    anomalib_result = compute_all_metrics(labels, scores, masks, maps, aupro_protocol="anomalib")
    assert anomalib_result["aupro"] == pytest.approx(aupro(masks, maps, protocol="anomalib"), abs=1e-12)
    assert all(isinstance(value, float) for value in result.values())


def test_compute_all_metrics_without_masks_has_image_keys_only() -> None:
    result = compute_all_metrics([0, 1, 1, 0], [0.1, 0.8, 0.7, 0.3])
    assert tuple(result) == ("image_auroc", "image_ap", "image_f1_max")
    assert result["image_auroc"] == 1.0


# --------------------------------------------------------------------------------------------
# AUPRO: hand-computed cases
# --------------------------------------------------------------------------------------------

# Region A = the top-left 2x2 block (4 px), region B = the bottom-right pixel (1 px).
TINY_MASK = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.uint8)
TINY_MAP = np.array([[1.0, 0.6, 0.0, 0.0], [0.3, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4], [0.0, 0.0, 0.0, 0.8]])


def test_reference_pro_curve_hand_computed() -> None:
    # Thresholds np.arange(0, 1, 0.25) = 0, .25, .5, .75 with `map > t`:
    #   t=0   : A 4/4, B 1 -> PRO 1;     FP: the 0.4 pixel -> 1/11
    #   t=.25 : A 3/4, B 1 -> PRO 0.875; FP 1/11
    #   t=.5  : A 2/4, B 1 -> PRO 0.75;  FP 0    (pixel-weighted would be 3/5 = 0.6)
    #   t=.75 : A 1/4, B 1 -> PRO 0.625; FP 0
    fprs, pros, thresholds = pro_curve(TINY_MASK, TINY_MAP, num_thresholds=4)
    np.testing.assert_allclose(thresholds, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(pros, [1.0, 0.875, 0.75, 0.625], atol=1e-15)
    np.testing.assert_allclose(fprs, [1 / 11, 1 / 11, 0.0, 0.0], atol=1e-15)


def test_reference_aupro_hand_computed_normalisation() -> None:
    # All four points have FPR < 0.3; FPRs rescaled to [1, 1, 0, 0]; the trapezoid between the
    # two FPR levels joins PRO 0.875 and 0.75, so the area is 0.8125. Without the min-max
    # rescaling (or dividing by 0.3 instead) the value would be 0.8125/11 (or 0.8125/3.3).
    assert aupro(TINY_MASK, TINY_MAP, num_thresholds=4) == pytest.approx(0.8125, abs=1e-12)
    assert oracle_reference_aupro(TINY_MASK[None], TINY_MAP[None], max_step=4) == pytest.approx(0.8125)


def test_anomalib_aupro_hand_computed() -> None:
    # Exact curve: (0,0) (0,.125) (0,.625) (0,.75) (1/11,.75) (1/11,.875) (1/11,1) (1,1).
    # Area on [0, .3] = .75/11 + (.3 - 1/11) * 1, divided by .3.
    expected = (0.75 / 11 + 0.3 - 1 / 11) / 0.3
    assert aupro(TINY_MASK, TINY_MAP, protocol="anomalib") == pytest.approx(expected, abs=1e-12)


def test_pro_is_the_mean_over_regions_not_pixel_weighted() -> None:
    # Region A (4 px) half detected, region B (1 px) fully detected: PRO 0.75, not 3/5.
    mask = TINY_MASK.astype(bool)
    scores = np.where(mask, 0.0, 0.0)
    scores[0, 0] = scores[0, 1] = scores[3, 3] = 1.0
    fprs, pros, _ = pro_curve(mask, scores, protocol="anomalib")
    assert pros[1] == pytest.approx(0.75)
    assert fprs[1] == 0.0


def test_regions_use_8_connectivity_within_an_image_only() -> None:
    # (0,0)-(1,1) touch diagonally: one region of 2 px with 8-connectivity (4-connectivity
    # would give two 1-px regions). Detecting (0,0) and (3,3): 8-conn PRO = (1/2 + 1)/2 = 0.75;
    # 4-conn would give (1 + 0 + 1)/3.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    scores = np.zeros((4, 4))
    scores[0, 0] = scores[3, 3] = 1.0
    _, pros, _ = pro_curve(mask, scores, protocol="anomalib")
    assert pros[1] == pytest.approx(0.75)
    # The same pixel anomalous in two consecutive images: two regions, not one 3-D component.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 1.0
    _, pros, _ = pro_curve(masks, maps, protocol="anomalib")
    assert pros[1] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# AUPRO: against the loop oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_reference_aupro_equals_loop_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(2, 5)), int(rng.integers(12, 28)), int(rng.integers(12, 28))
    masks = random_masks(rng, n, h, w, density=float(rng.uniform(0.55, 0.65)))
    maps = random_maps(rng, masks, signal=float(rng.uniform(0.05, 0.6)))
    if seed % 2:
        maps = maps.astype(np.float32)  # the thresholds must follow the reference dtype rules
    expected = oracle_reference_aupro(masks, maps)
    assert aupro(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-10)


def test_reference_aupro_other_step_count_and_limit() -> None:
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 3, 20, 20)
    maps = random_maps(rng, masks, signal=0.2)
    expected = oracle_reference_aupro(masks, maps, max_step=57, expect_fpr=0.6)
    got = aupro(masks, maps, num_thresholds=57, fpr_limit=0.6)
    assert got == pytest.approx(expected, abs=1e-10)


def test_reference_aupro_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(12)
    masks = random_masks(rng, 5, 16, 16)
    maps = random_maps(rng, masks)
    whole = aupro(masks, maps)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 300)  # about one image per chunk
    assert aupro(masks, maps) == pytest.approx(whole, abs=1e-14)
    assert aupro(masks, maps) == pytest.approx(oracle_reference_aupro(masks, maps), abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_anomalib_aupro_equals_loop_oracle(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = random_masks(rng, 3, 14, 15)
    maps = np.round(random_maps(rng, masks, signal=0.3), 2 + seed % 2)  # ties included
    limit = [0.3, 0.05, 0.7, 1.0][seed]
    expected = oracle_exact_aupro(masks, maps, fpr_limit=limit)
    assert aupro(masks, maps, protocol="anomalib", fpr_limit=limit) == pytest.approx(expected, abs=1e-10)


def test_protocols_differ_and_are_bounded() -> None:
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, 20, 20)
    maps = random_maps(rng, masks, signal=0.15)
    reference = aupro(masks, maps)
    exact = aupro(masks, maps, protocol="anomalib")
    assert 0.0 <= exact <= 1.0 and 0.0 <= reference <= 1.0
    assert abs(reference - exact) > 1e-3


def test_perfect_and_random_maps() -> None:
    rng = np.random.default_rng(6)
    masks = random_masks(rng, 4, 24, 24)
    perfect = masks + 0.01 * rng.random(masks.shape)  # every anomaly above every normal pixel
    assert aupro(masks, perfect, protocol="anomalib") == pytest.approx(1.0)
    noise = rng.random((40, 32, 32))
    noise_masks = random_masks(rng, 40, 32, 32)
    # Random scores: PRO ~= FPR, so the area up to the limit / limit is ~= limit / 2.
    assert aupro(noise_masks, noise, protocol="anomalib") == pytest.approx(0.15, abs=0.02)
    # Reference rescales the FPR axis to [0, 1]: PRO rises ~linearly from ~0.0 to ~0.3.
    assert aupro(noise_masks, noise) == pytest.approx(0.15, abs=0.02)


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


def test_no_anomalous_pixel_raises_and_compute_all_reports_nan() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    maps = np.random.default_rng(7).random((3, 8, 8))
    for function in (aupro, pixel_auroc, pixel_ap, pixel_f1_max):
        with pytest.raises(ValueError, match="No anomalous pixel"):
            function(masks, maps)
    with pytest.warns(RuntimeWarning, match="no mask has an anomalous pixel"):
        result = compute_all_metrics([0, 1, 0], [0.1, 0.9, 0.2], masks, maps)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert math.isnan(result[key])
    assert result["image_auroc"] == 1.0


def test_single_image_class_raises_and_compute_all_reports_nan() -> None:
    with pytest.raises(ValueError, match="without anomalous samples"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="without normal samples"):
        image_ap([1, 1], [0.1, 0.2])
    with pytest.warns(RuntimeWarning, match="every image is anomalous"):
        result = compute_all_metrics([1, 1], [0.1, 0.2])
    assert all(math.isnan(value) for value in result.values())


def test_invalid_inputs_raise_clear_errors() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:4] = True
    maps = np.random.default_rng(8).random((2, 8, 8))
    with pytest.raises(ValueError, match="Resize the masks"):
        aupro(masks, maps[:, :7])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, bad)
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [np.nan, 1.0])
    with pytest.raises(ValueError, match="binary"):
        aupro(masks * 0.5, maps)
    with pytest.raises(ValueError, match="Unknown AUPRO protocol"):
        aupro(masks, maps, protocol="cflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=0)
    with pytest.raises(ValueError, match="shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_all_metrics([0, 1], [0.1, 0.2], masks=masks)
    with pytest.raises(ValueError, match="normal pixels"):
        aupro(np.ones((1, 4, 4), dtype=bool), maps[:1, :4, :4])


def test_accepted_layouts() -> None:
    rng = np.random.default_rng(9)
    masks = random_masks(rng, 3, 10, 10)
    maps = random_maps(rng, masks)
    value = aupro(masks, maps)
    assert aupro(masks[:, None], maps[:, None]) == value
    assert aupro(masks.astype(np.float32), maps) == value
    i = int(np.argmax(masks.sum(axis=(1, 2))))
    assert aupro(masks[i], maps[i]) == pytest.approx(aupro(masks[i : i + 1], maps[i : i + 1]))


def test_reference_degenerate_cases_follow_the_reference() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[1, 1:3, 1:3] = True
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(aupro(masks, np.full(masks.shape, 0.5)))
    # A map equal to the mask: every threshold in [0, 1) has FPR 0, so the reference's
    # min-max rescaling is 0/0.
    with pytest.warns(RuntimeWarning, match="span no FPR range"):
        assert math.isnan(aupro(masks, masks.astype(float)))
    # Half of the normal pixels at the maximum: no threshold reaches FPR < 0.3 -> 0.0.
    maps = np.where(masks, 0.5, 0.0)
    maps[0] = 1.0
    with pytest.warns(RuntimeWarning, match="no threshold reaches"):
        assert aupro(masks, maps) == 0.0
    # The exact protocol is well defined on all three.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aupro(masks, masks.astype(float), protocol="anomalib") == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

MONOTONE_TRANSFORMS = {
    "exp": np.exp,
    "cube_plus_x": lambda x: x**3 + x,
    "tanh": lambda x: np.tanh(x / 4),
    "affine": lambda x: 3.0 * x - 7.0,
}


def _grid_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks and maps on a coarse grid of values (so monotone transforms keep them distinct)."""
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 3, 12, 12)
    maps = np.round(random_maps(rng, masks) * 8) / 8 * 5  # values k/8*5 in [0, ~7]
    return masks, maps


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), transform=st.sampled_from(sorted(MONOTONE_TRANSFORMS)))
def test_auroc_and_anomalib_aupro_invariant_to_monotone_transforms(seed: int, transform: str) -> None:
    masks, maps = _grid_case(seed)
    transformed = MONOTONE_TRANSFORMS[transform](maps)
    labels = masks.any(axis=(1, 2))
    labels[0] = False
    labels[-1] = True
    scores = maps.max(axis=(1, 2))
    assert image_auroc(labels, MONOTONE_TRANSFORMS[transform](scores)) == pytest.approx(
        image_auroc(labels, scores), abs=1e-12
    )
    assert pixel_auroc(masks, transformed) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert aupro(masks, transformed, protocol="anomalib") == pytest.approx(
        aupro(masks, maps, protocol="anomalib"), abs=1e-12
    )


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-50.0, 50.0),
)
def test_reference_aupro_invariant_to_positive_affine_transforms(seed: int, scale: float, shift: float) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 3, 12, 12)
    maps = random_maps(rng, masks)  # continuous values: none sits on a threshold
    transformed = scale * maps + shift
    # np.arange may round to a 201st threshold within rounding of the maximum (see the next
    # test), a knife edge for the top pixel; invariance is exact up to that quirk.
    assume(len(pro_curve(masks, maps)[2]) == len(pro_curve(masks, transformed)[2]) == 200)
    assert aupro(masks, transformed) == pytest.approx(aupro(masks, maps), abs=1e-9)


def test_reference_keeps_the_np_arange_201_threshold_quirk() -> None:
    # (max - min) / delta can round above 200, so np.arange yields a 201st threshold just above
    # the maximum (FPR 0, PRO 0), which changes the area. The reference does this; so do we.
    rng = np.random.default_rng(177)
    masks = random_masks(rng, 3, 12, 12)
    maps = random_maps(rng, masks)
    fprs, pros, thresholds = pro_curve(masks, maps)
    assert len(thresholds) == 201 and thresholds[-1] > maps.max()
    assert fprs[-1] == 0.0 and pros[-1] == 0.0
    assert len(pro_curve(masks, maps + 1.0)[2]) == 200
    for candidate in (maps, maps + 1.0):
        assert aupro(masks, candidate) == pytest.approx(oracle_reference_aupro(masks, candidate), abs=1e-10)
    assert abs(aupro(masks, maps) - aupro(masks, maps + 1.0)) > 1e-3


def test_reference_aupro_is_not_invariant_to_nonlinear_monotone_transforms() -> None:
    # Evenly spaced thresholds move relative to the scores under a nonlinear transform.
    rng = np.random.default_rng(21)
    masks = random_masks(rng, 4, 20, 20)
    maps = random_maps(rng, masks, signal=0.2)
    assert abs(aupro(masks, maps**4) - aupro(masks, maps)) > 1e-3
    # ... while the exact protocol does not move.
    assert aupro(masks, maps**4, protocol="anomalib") == pytest.approx(
        aupro(masks, maps, protocol="anomalib"), abs=1e-12
    )


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), protocol=st.sampled_from(["reference", "anomalib"]))
def test_metrics_invariant_to_image_order(seed: int, protocol: metrics.AuproProtocol) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 5, 10, 10)
    maps = random_maps(rng, masks)
    labels = masks.any(axis=(1, 2))
    labels[0], labels[1] = False, True
    scores = maps.mean(axis=(1, 2))
    order = rng.permutation(len(masks))
    original = compute_all_metrics(labels, scores, masks, maps, aupro_protocol=protocol)
    permuted = compute_all_metrics(labels[order], scores[order], masks[order], maps[order], aupro_protocol=protocol)
    for key in METRIC_KEYS:
        assert permuted[key] == pytest.approx(original[key], abs=1e-12, nan_ok=True)
