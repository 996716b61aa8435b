# SPDX-License-Identifier: Apache-2.0
"""pipeline("anomaly-detection"): inputs of every kind, single and batched, values equal to the model's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_samples
from PIL import Image
from transformers import pipeline

from mrad_hf import AnomalyDetectionPipeline, MRADImageProcessor, MRADInputError
from mrad_hf.hub.api import load_detector_bundle


@pytest.fixture
def detector(model_with_bank):
    return pipeline(
        "anomaly-detection",
        model=model_with_bank,
        image_processor=MRADImageProcessor.from_config(model_with_bank.config),
        device="cpu",
    )


def test_single_image_values_equal_direct_model_call(detector, model_with_bank, tmp_path):
    image = make_samples(1, seed=11, height=90, width=70)[0]["image"]
    inputs = MRADImageProcessor.from_config(model_with_bank.config)(image)
    direct = model_with_bank(pixel_values=inputs["pixel_values"])
    expected_map = F.interpolate(direct.anomaly_map[:, None], size=(90, 70), mode="bilinear", align_corners=False)[
        0, 0
    ]
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


def test_documented_output_structure_and_heatmap(detector):
    image = make_samples(1, seed=14, height=60, width=80)[0]["image"]
    result = detector(image, threshold=0.5)
    assert set(result) == {"score", "anomaly_map", "heatmap", "is_anomalous", "label", "mask", "thresholds"}
    assert isinstance(result["score"], float) and result["label"] in ("anomaly", "normal")
    assert (
        result["anomaly_map"].shape == (60, 80) and result["mask"].shape == (60, 80) and result["mask"].dtype == bool
    )
    heatmap = result["heatmap"]
    assert isinstance(heatmap, Image.Image) and heatmap.mode == "L" and heatmap.size == (80, 60)
    # a fixed scale (value * 255), not stretched per image: a normal image must not look anomalous
    np.testing.assert_array_equal(
        np.asarray(heatmap), np.round(np.clip(result["anomaly_map"], 0, 1) * 255).astype(np.uint8)
    )
    with pytest.raises(ValueError, match="finite"):
        detector(image, threshold=float("nan"))


@pytest.fixture
def local_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path (no internet), yielding its base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_and_timeout_go_through_transformers_load_image(detector, local_server, tmp_path, monkeypatch):
    import transformers.image_utils

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    image = make_samples(1, seed=15, height=50, width=70)[0]["image"]
    Image.fromarray(image).save(tmp_path / "part.png")
    calls = []
    original = transformers.image_utils.load_image
    monkeypatch.setattr(transformers.image_utils, "load_image", lambda *a, **k: calls.append(k) or original(*a, **k))
    from_url = detector(f"{local_server}/part.png", timeout=5.0)
    assert calls == [{"timeout": 5.0}]
    from_path = detector(str(tmp_path / "part.png"))
    assert from_url["score"] == from_path["score"] and from_url["anomaly_map"].shape == (50, 70)
    np.testing.assert_array_equal(from_url["anomaly_map"], from_path["anomaly_map"])
    with pytest.raises(MRADInputError, match=r"URL 'http://127\.0\.0\.1:\d+/missing\.png' could not be fetched"):
        detector(f"{local_server}/missing.png", timeout=5.0)  # a 404 page is not an image


def test_tiny_images_are_refused_by_every_route(detector, model_with_bank, tmp_path):
    model_with_bank.save_pretrained(tmp_path / "model")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    from_folder = pipeline("anomaly-detection", model=str(tmp_path / "model"), device="cpu")
    _, processor = load_detector_bundle(tmp_path / "model")
    messages = []
    for route in (detector, from_folder, processor):
        with pytest.raises(MRADInputError) as caught:
            route(str(tmp_path / "dot.png"))
        messages.append(str(caught.value))
    assert len(set(messages)) == 1 and "is 1x1 pixels" in messages[0] and "dot.png" in messages[0]


def test_one_folder_gives_one_score_through_pipeline_and_loader(samples, tmp_path):
    """The folder's own preprocessor_config.json decides, for `pipeline(model=folder)` and `load_detector_bundle` alike."""
    from conftest import make_tiny_model

    from mrad_hf.memory import build_memory_bank

    model = make_tiny_model(
        image_mean=[0.5, 0.5, 0.5]
    )  # a processor that differs from the defaults, bank built with it
    build_memory_bank(model, samples, batch_size=4, source="unit-test", progress=False)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    images = [s["image"] for s in make_samples(3, seed=16)]
    from_pipeline = [r["score"] for r in pipeline("anomaly-detection", model=str(folder), device="cpu")(images)]
    loaded, processor = load_detector_bundle(folder)
    assert processor.image_mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        from_loader = loaded(**processor(images)).anomaly_score.tolist()
        from_defaults = model(**MRADImageProcessor(image_size=model.config.image_size)(images)).anomaly_score.tolist()
    # the same file's processor; equal to float rounding (the pipeline scores one image per call and batch invariance
    # is opt-in, config.batch_invariant), far closer than the other processor below
    assert from_pipeline == pytest.approx(from_loader, abs=1e-6, rel=0)
    assert from_loader != pytest.approx(from_defaults, abs=1e-6)  # the file mattered: ignoring it gives other scores


def test_loader_refuses_a_processor_that_does_not_fit_the_model(model_with_bank, tmp_path):
    import json

    model_with_bank.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    saved["size"] = saved["crop_size"] = {"height": 28, "width": 28}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    with pytest.raises(
        ValueError,
        match=r"preprocessor_config.json and the model's config.json .* size \{'height': 28, 'width': 28\} in",
    ):
        load_detector_bundle(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()  # no file: the config's processor
    _, processor = load_detector_bundle(tmp_path)
    assert processor.to_dict() == MRADImageProcessor.from_config(model_with_bank.config).to_dict()


def test_explain_without_mrad_hf_names_the_package(detector, monkeypatch):
    import importlib

    real = importlib.import_module

    def without_mrad_hf(name, *args):
        if name.startswith("mrad_hf"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_mrad_hf)
    with pytest.raises(ImportError, match=r"pip install mrad-hf"):
        detector(np.zeros((30, 30, 3), np.uint8), explain=True)
