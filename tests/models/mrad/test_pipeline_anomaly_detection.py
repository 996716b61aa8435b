# SPDX-License-Identifier: Apache-2.0
"""pipeline("anomaly-detection"): inputs of every kind, single and batched, values equal to the model's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_samples
from PIL import Image
from transformers import pipeline

from mrad_hf import AnomalyDetectionPipeline, MRADImageProcessor


@pytest.fixture
def detector(model_with_bank):
    return pipeline("anomaly-detection", model=model_with_bank, image_processor=MRADImageProcessor.from_config(model_with_bank.config), device="cpu")


def test_single_image_values_equal_direct_model_call(detector, model_with_bank, tmp_path):
    image = make_samples(1, seed=11, height=90, width=70)[0]["image"]
    inputs = MRADImageProcessor.from_config(model_with_bank.config)(image)
    direct = model_with_bank(pixel_values=inputs["pixel_values"])
    expected_map = F.interpolate(direct.anomaly_map[:, None], size=(90, 70), mode="bilinear", align_corners=False)[0, 0]
    path = tmp_path / "query.png"
    Image.fromarray(image).save(path)
    for source in (image, Image.fromarray(image), str(path)):
        result = detector(source)
        assert isinstance(detector, AnomalyDetectionPipeline)
        assert result["score"] == pytest.approx(direct.anomaly_score.item(), abs=1e-6)
        assert result["anomaly_map"].shape == (90, 70) and result["anomaly_map"].dtype == np.float32
        np.testing.assert_allclose(result["anomaly_map"], expected_map.numpy(), atol=1e-6)
        assert "label" not in result and "mask" not in result


def test_batched_equals_single_and_thresholds(detector):
    images = [s["image"] for s in make_samples(5, seed=12)]
    singles = [detector(image)["score"] for image in images]
    batched = detector(images, batch_size=2)
    assert [r["score"] for r in batched] == pytest.approx(singles, abs=1e-6)
    middle = float(np.median(singles))
    decided = detector(images, threshold=middle)
    assert [r["label"] for r in decided] == ["anomaly" if s > middle else "normal" for s in singles]
    assert [r["is_anomalous"] for r in decided] == [s > middle for s in singles]
    assert decided[0]["thresholds"] == {"image": middle, "pixel": middle, "from": "arguments"}
    pixel = detector(images[0], threshold=middle, pixel_threshold=0.0)
    assert pixel["mask"].dtype == bool and pixel["mask"].all()  # probabilities are > 0 everywhere
    assert detector(images[0], pixel_threshold=1.0)["mask"].sum() == 0


def test_pipeline_from_saved_folder(model_with_bank, tmp_path):
    model_with_bank.save_pretrained(tmp_path)
    # with mrad_hf installed, the explicit task uses the local (registered) pipeline: no remote code needed
    from_folder = pipeline("anomaly-detection", model=str(tmp_path), device="cpu")
    assert type(from_folder) is AnomalyDetectionPipeline
    image = make_samples(1, seed=13)[0]["image"]
    inputs = MRADImageProcessor.from_config(model_with_bank.config)(image)
    assert from_folder(image)["score"] == pytest.approx(model_with_bank(**inputs).anomaly_score.item(), abs=1e-6)


def test_pipeline_rejects_unknown_arguments(detector):
    with pytest.raises(TypeError, match="unexpected arguments"):
        detector(np.zeros((30, 30, 3), np.uint8), colour="red")
