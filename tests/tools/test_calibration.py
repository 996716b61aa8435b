# SPDX-License-Identifier: Apache-2.0
"""Calibrated decisions: the conformal estimator, the promised false-positive rate on held-out normals, and how
thresholds travel with the model into the pipeline."""

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from scipy.stats import betabinom
from transformers import pipeline

from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor
from mrad_hf.data.synthetic import load_texture, paste_defect, sample_normal_image
from mrad_hf.memory import build_memory_bank
from mrad_hf.tools.calibration import (
    ConformalError,
    apply_calibration,
    calibrate,
    conformal_threshold,
    minimum_normal_images,
    resampling_study,
    score_images,
)

SIZE = 56  # the tiny backbone's native size: fast, and enough for many scores


def test_conformal_threshold_is_the_right_order_statistic():
    scores = np.arange(1.0, 20.0)  # n = 19 distinct scores 1..19
    assert conformal_threshold(scores, 0.05) == 19.0  # k = ceil(20 * 0.95) = 19
    assert conformal_threshold(scores, 0.1) == 18.0  # k = ceil(20 * 0.9) = 18
    assert conformal_threshold(scores[::-1], 0.25) == 15.0  # k = 15, order of the input does not matter
    assert [minimum_normal_images(a) for a in (0.1, 0.05, 0.01, 0.3)] == [9, 19, 99, 3]
    with pytest.raises(ConformalError, match="at least 19 known-good images .* got 18"):
        conformal_threshold(scores[:18], 0.05)
    with pytest.raises(ValueError, match="false-positive rate in \\(0, 1\\)"):
        conformal_threshold(scores, 5)


@pytest.fixture(scope="module")
def brick_model_and_normals():
    rng = np.random.default_rng(0)
    texture = load_texture("brick")
    normals = [sample_normal_image(texture, rng, SIZE) for _ in range(200)]
    memory = []
    for index in range(8):
        image = sample_normal_image(texture, rng, SIZE)
        if index % 2:
            image, mask = paste_defect(image, "blob", rng)
            memory.append({"image": image, "label": 1, "mask": mask})
        else:
            memory.append({"image": image, "label": 0})
    model = make_tiny_model(image_size=SIZE, retrieval_temperature=0.01)
    build_memory_bank(model, memory, source="brick", progress=False)
    return model, normals


def test_promised_false_positive_rate_on_held_out_normals(brick_model_and_normals):
    model, normals = brick_model_and_normals
    target, n = 0.1, 59
    calibration = calibrate(model, normals[:n], target_fpr=target, progress=False, batch_size=64)
    held_out, _, _ = score_images(model, normals[n:], progress=False, batch_size=64)
    flagged, m = int((held_out > calibration["image_threshold"]).sum()), len(held_out)
    # exchangeable continuous scores: the held-out count above the k-th of n calibration scores is
    # BetaBinomial(m, n + 1 - k, k) (a binomial whose rate is the random coverage of that order statistic);
    # mean m (n + 1 - k) / (n + 1) <= target m. Accept anything but the extreme 0.1 % tails.
    k = math.ceil((n + 1) * (1 - target))
    law = betabinom(m, n + 1 - k, k)
    print(
        f"held-out normals flagged: {flagged} of {m}; accepted band [{law.ppf(0.001):.0f}, {law.ppf(0.999):.0f}], mean {law.mean():.1f}"
    )
    assert law.ppf(0.001) <= flagged <= law.ppf(0.999), (flagged, m)
    assert law.mean() <= target * m
    assert not np.any(held_out == calibration["image_threshold"])  # no tie at the threshold: the count is the law's
    # the pixel threshold is the same order statistic over the calibration images' pixels
    _, maps, _ = score_images(model, normals[:n], progress=False, batch_size=64)
    pixels = maps.size
    assert (maps > calibration["pixel_threshold"]).mean() <= calibration["pixel_fpr"] == 0.01
    assert (maps >= calibration["pixel_threshold"]).mean() >= 0.01 - 1 / pixels
    assert calibration["n_normal_images"] == n and calibration["bank"]["image_entries"] == 8


def test_resampling_study_matches_the_estimator():
    pool = np.random.default_rng(1).normal(size=2000)
    rows = resampling_study(pool, [19, 99], target_fpr=0.05, repeats=300, seed=0)
    assert [r["n"] for r in rows] == [19, 99]
    for row in rows:  # the mean achieved rate is within sampling error of the conformal mean (n + 1 - k) / (n + 1)
        n = row["n"]
        expected = (n + 1 - math.ceil((n + 1) * 0.95)) / (n + 1)
        assert row["fpr_mean"] == pytest.approx(
            expected, abs=4 * math.sqrt(expected * (1 - expected) / n / 300) + 0.005
        )
    assert rows[1]["threshold_sd"] < rows[0]["threshold_sd"]  # more images, a steadier threshold


def test_calibration_travels_with_the_model_and_drives_pipeline_decisions(brick_model_and_normals, tmp_path):
    model, normals = brick_model_and_normals
    calibration = calibrate(model, normals[:19], target_fpr=0.05, pixel_fpr=0.02, progress=False, batch_size=64)
    bank = model.get_memory_bank()
    apply_calibration(model, calibration, bank=bank)
    assert bank.metadata["calibration"]["image_threshold"] == calibration["image_threshold"]
    model.save_pretrained(tmp_path / "calibrated")
    reloaded = MRADForAnomalyDetection.from_pretrained(tmp_path / "calibrated")
    assert reloaded.calibration == calibration
    detect = pipeline(
        "anomaly-detection",
        model=reloaded,
        image_processor=MRADImageProcessor.from_pretrained(tmp_path / "calibrated"),
        device="cpu",
    )
    results = detect(normals[19:40])
    for result in results:
        assert result["is_anomalous"] == (result["score"] > calibration["image_threshold"])
        assert result["label"] == ("anomaly" if result["is_anomalous"] else "normal")
        np.testing.assert_array_equal(result["mask"], result["anomaly_map"] > calibration["pixel_threshold"])
        assert result["thresholds"] == {
            "image": calibration["image_threshold"],
            "pixel": calibration["pixel_threshold"],
            "from": "calibration",
        }
    explicit = detect(normals[19], threshold=0.0)  # explicit arguments win; the calibrated pixel threshold stays
    assert explicit["is_anomalous"] and explicit["thresholds"] == {
        "image": 0.0,
        "pixel": calibration["pixel_threshold"],
        "from": "arguments",
    }
    both = detect(normals[19], threshold=0.0, pixel_threshold=1.0)
    assert both["mask"].sum() == 0 and both["thresholds"]["pixel"] == 1.0


def test_calibration_from_the_bank_metadata_and_stale_bank_warning(brick_model_and_normals):
    model, normals = brick_model_and_normals
    calibration = calibrate(model, normals[:9], target_fpr=0.1, progress=False, batch_size=64)
    bank = model.get_memory_bank()
    apply_calibration(model, calibration, bank=bank)
    model.calibration = None
    model.set_memory_bank(bank)  # the bank carries the thresholds
    detect = pipeline(
        "anomaly-detection", model=model, image_processor=MRADImageProcessor.from_config(model.config), device="cpu"
    )
    assert detect(normals[50])["thresholds"]["from"] == "calibration"
    smaller = bank.__class__(
        **{
            **bank.tensors(),
            "image_keys": bank.image_keys[:4],
            "image_values": bank.image_values[:4],
            "patch_keys": bank.patch_keys[:2],
            "patch_values": bank.patch_values[:2],
            "patch_sources": bank.patch_sources[:2],
        },
        metadata={k: v for k, v in bank.metadata.items() if k not in ("image_ids", "image_sources", "image_sha256")},
    )
    model.set_memory_bank(smaller)
    model.calibration = calibration
    with pytest.warns(UserWarning, match="calibration was made with a memory bank of 8 image"):
        detect(normals[50])
    model.calibration = None
    model.memory.metadata = {}
    assert "is_anomalous" not in detect(normals[50])


def test_calibrate_rejects_too_few_images_before_scoring(brick_model_and_normals):
    model, normals = brick_model_and_normals
    with pytest.raises(ConformalError, match="needs at least 99 known-good images"):
        calibrate(model, normals[:10], target_fpr=0.01, progress=False)
    with pytest.raises(ValueError, match="finite 'pixel_threshold'"):
        apply_calibration(model, {"image_threshold": 0.5, "pixel_threshold": float("nan")})


def test_known_defects_report_recall(brick_model_and_normals):
    model, normals = brick_model_and_normals
    rng = np.random.default_rng(5)
    defects = [paste_defect(normals[100 + i], "blob", rng) for i in range(4)]
    calibration = calibrate(
        model,
        normals[:9],
        target_fpr=0.1,
        defect_images=[d[0] for d in defects],
        defect_masks=[d[1] for d in defects],
        progress=False,
    )
    scores, maps, masks = score_images(model, [d[0] for d in defects], masks=[d[1] for d in defects], progress=False)
    assert calibration["defects"]["n_images"] == 4
    assert calibration["defects"]["image_recall"] == pytest.approx(
        float((scores > calibration["image_threshold"]).mean())
    )
    assert calibration["defects"]["pixel_recall"] == pytest.approx(
        float((maps[masks] > calibration["pixel_threshold"]).mean())
    )
    assert torch.is_tensor(torch.as_tensor(maps))


def test_a_calibration_records_a_random_backbone(brick_model_and_normals):
    """Thresholds chosen on a randomly initialised backbone say so (the JSON travels without the bank)."""
    model, normals = brick_model_and_normals
    assert calibrate(model, normals[:9], target_fpr=0.1, progress=False, batch_size=64)["random_backbone"] is None
    model.random_backbone = "random-tiny"  # what `--clip random-tiny` sets
    try:
        calibration = calibrate(model, normals[:9], target_fpr=0.1, progress=False, batch_size=64)
    finally:
        del model.random_backbone
    assert calibration["random_backbone"] == "random-tiny"
