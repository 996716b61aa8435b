# SPDX-License-Identifier: Apache-2.0
"""`MRADAnomalib` against the anomalib API it needs, with the labelled fake of tests/integrations/fake_anomalib.py
(real anomalib does not import beside CI's torch 2.13 CPU build; see that file). Values, not shapes: the fields the
adapter writes equal MRAD's own outputs on the same normalised pixels; thresholds decide labels and masks."""

from __future__ import annotations

import importlib
import sys

import fake_anomalib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_IMAGE_SIZE

from mrad_hf.memory import build_memory_bank


@pytest.fixture
def adapter_module(monkeypatch):
    fake_anomalib.install(monkeypatch)
    module = importlib.import_module("mrad_hf.integrations.anomalib")
    yield module
    sys.modules.pop("mrad_hf.integrations.anomalib", None)


def _images(count=3, size=96, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(model, images):
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = F.interpolate(
        images, size=(TINY_IMAGE_SIZE,) * 2, mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    with torch.no_grad():
        out = model(pixel_values=(pixels - mean) / std)
    maps = F.interpolate(out.anomaly_map[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return out.anomaly_score, maps


@pytest.mark.parametrize("variant", ["tf", "ft", "clip"])
def test_batch_fields_are_mrads_scores_and_maps(adapter_module, variant, samples):
    from conftest import make_tiny_trained_model

    model = make_tiny_trained_model(variant)
    build_memory_bank(model, samples, batch_size=4, source="unit-test", progress=False)
    module = adapter_module.MRADAnomalib(model, pre_processor=False)
    assert module.learning_type == fake_anomalib.LearningType.ZERO_SHOT and module.trainer_arguments == {}
    images = _images()
    batch = fake_anomalib.ImageBatch(image=images)
    for step in (module.test_step, module.predict_step, module.validation_step):
        out = step(batch, 0)
        expected_score, expected_map = _reference(model, images)
        torch.testing.assert_close(out.pred_score, expected_score, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.anomaly_map, expected_map, rtol=0, atol=1e-6)
        assert out.anomaly_map.shape == (3, 96, 96) and out.pred_label is None and out.pred_mask is None

    # at the model's own size nothing is resized: the map is the model's map
    at_size = _images(2, TINY_IMAGE_SIZE, seed=1)
    out = module.predict_step(fake_anomalib.ImageBatch(image=at_size), 0)
    mean, std = module.image_mean, module.image_std
    with torch.no_grad():
        direct = model(pixel_values=(at_size - mean) / std)
    torch.testing.assert_close(out.anomaly_map, direct.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(out.pred_score, direct.anomaly_score, rtol=0, atol=0)


def test_thresholds_and_calibration_give_labels_and_masks(adapter_module, model_with_bank):
    images = _images(4, seed=2)
    scores, maps = _reference(model_with_bank, images)
    threshold, pixel_threshold = float(scores.median()), float(maps.mean())
    module = adapter_module.MRADAnomalib(
        model_with_bank, threshold=threshold, pixel_threshold=pixel_threshold, pre_processor=False
    )
    assert not module.post_processor.enable_normalization and not module.post_processor.enable_thresholding
    assert adapter_module.MRADAnomalib(model_with_bank, pre_processor=False).post_processor.enable_normalization
    out = module.test_step(fake_anomalib.ImageBatch(image=images), 0)
    assert out.pred_label.dtype == torch.bool and out.pred_label.tolist() == (scores > threshold).tolist()
    np.testing.assert_array_equal(out.pred_mask.numpy(), (maps > pixel_threshold).numpy())

    model_with_bank.calibration = {"image_threshold": 0.0, "pixel_threshold": 1.0}  # every score > 0, no map value > 1
    calibrated = adapter_module.MRADAnomalib(model_with_bank, pre_processor=False)
    out = calibrated.test_step(fake_anomalib.ImageBatch(image=images), 0)
    assert out.pred_label.all() and not out.pred_mask.any()
    with pytest.raises(RuntimeError, match="zero-shot"):
        calibrated.training_step(None, 0)


def test_loads_saved_folders_and_names_the_extra_when_anomalib_is_missing(
    adapter_module, model_with_bank, tmp_path, monkeypatch
):
    model_with_bank.save_pretrained(tmp_path / "model")
    module = adapter_module.MRADAnomalib(str(tmp_path / "model"), pre_processor=False)
    images = _images(2, seed=4)
    torch.testing.assert_close(
        module.predict_step(fake_anomalib.ImageBatch(image=images), 0).pred_score,
        _reference(model_with_bank, images)[0],
    )

    monkeypatch.setitem(sys.modules, "anomalib", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "mrad_hf.integrations.anomalib")
    with pytest.raises(ImportError, match=r'pip install "mrad-hf\[anomalib\]"'):
        importlib.import_module("mrad_hf.integrations.anomalib")
