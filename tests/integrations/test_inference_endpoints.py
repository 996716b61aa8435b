# SPDX-License-Identifier: Apache-2.0
"""The Inference Endpoints handler (`handler.py`, written by push_model) called directly on a saved model folder.

Values are compared with the model's own outputs on the same image: the score exactly, the map (bilinearly resized
to the input size, 16-bit PNG) to its quantisation step; thresholds from the request and from a calibration.
A subprocess loads the handler with `mrad_hf` made unimportable, as on an endpoint where only the repo exists.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_samples
from PIL import Image

from mrad_hf import MRADImageProcessor
from mrad_hf.hub.api import ENDPOINT_HANDLER_FILE, write_endpoint_handler
from mrad_hf.integrations.inference_endpoints import MAP_FORMAT, EndpointHandler, decode_map
from mrad_hf.memory import build_memory_bank


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    from conftest import make_tiny_model

    model = make_tiny_model()
    build_memory_bank(model, make_samples(), batch_size=4, source="unit-test", progress=False)
    folder = tmp_path_factory.mktemp("endpoint") / "model"
    model.save_pretrained(folder)
    write_endpoint_handler(folder)
    return folder


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(folder, image: np.ndarray):
    from mrad_hf import MRADForAnomalyDetection

    model = MRADForAnomalyDetection.from_pretrained(folder).eval()
    pixel_values = MRADImageProcessor.from_pretrained(folder)(Image.fromarray(image), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    resized = F.interpolate(out.anomaly_map[:, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return float(out.anomaly_score[0]), resized.numpy()


def test_handler_file_is_written_verbatim(saved_folder):
    assert (saved_folder / "handler.py").read_bytes() == ENDPOINT_HANDLER_FILE.read_bytes()


def test_base64_and_bytes_requests_return_the_models_score_and_map(saved_folder):
    image = make_samples(2, seed=11, height=90, width=130)[1]["image"]
    expected_score, expected_map = _expected(saved_folder, image)
    handler = EndpointHandler(str(saved_folder))
    payload = _png_bytes(image)

    [from_base64] = handler({"inputs": base64.b64encode(payload).decode()})
    [from_bytes] = handler({"inputs": payload})
    [from_data_uri] = handler({"inputs": "data:image/png;base64," + base64.b64encode(payload).decode()})
    for response in (from_base64, from_bytes, from_data_uri):
        assert response["score"] == pytest.approx(expected_score, abs=1e-6)
        assert (response["width"], response["height"]) == (130, 90) and response["anomaly_map_format"] == MAP_FORMAT
        decoded = decode_map(response["anomaly_map"])
        assert decoded.shape == (90, 130)
        np.testing.assert_allclose(decoded, np.clip(expected_map, 0, 1), atol=0.51 / 65535 + 1e-6)
        assert "label" not in response  # no threshold given and the model is not calibrated
    assert json.loads(json.dumps(from_base64)) == from_base64  # a JSON response as the endpoint sends it


def test_threshold_parameter_and_calibration_decide_label_and_mask(saved_folder, tmp_path):
    images = [s["image"] for s in make_samples(2, seed=5)]
    scores_maps = [_expected(saved_folder, image) for image in images]
    threshold = float(np.mean([score for score, _ in scores_maps]))  # one image above, one below
    handler = EndpointHandler(str(saved_folder))
    responses = handler(
        {
            "inputs": [_png_bytes(image) for image in images],
            "parameters": {"threshold": threshold, "pixel_threshold": 0.3},
        }
    )
    for response, (score, anomaly_map) in zip(responses, scores_maps):
        assert response["is_anomalous"] is (score > threshold)
        assert response["label"] == ("anomaly" if score > threshold else "normal")
        assert response["threshold"] == {"image": threshold, "pixel": 0.3, "from": "parameters"}
        with Image.open(io.BytesIO(base64.b64decode(response["mask"]))) as mask:
            np.testing.assert_array_equal(np.asarray(mask) > 0, anomaly_map > 0.3)
    assert {r["label"] for r in responses} == {"anomaly", "normal"}

    calibrated = tmp_path / "calibrated"
    shutil.copytree(saved_folder, calibrated)
    (calibrated / "calibration.json").write_text(
        json.dumps({"image_threshold": 0.0, "pixel_threshold": 1.0})
    )  # in range: every score > 0, no map value > 1
    [response] = EndpointHandler(str(calibrated))({"inputs": _png_bytes(images[0])})
    assert response["label"] == "anomaly" and response["threshold"]["from"] == "calibration"
    with Image.open(io.BytesIO(base64.b64decode(response["mask"]))) as mask:
        assert not np.asarray(mask).any()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image": "x"}, '"inputs"'),
        ({"inputs": "/etc/passwd"}, "local file paths are not accepted"),
        ({"inputs": base64.b64encode(b"not an image").decode()}, "could not be decoded as an image"),
        ({"inputs": "aGVsbG8=", "parameters": {"treshold": 1}}, "Unknown parameters ['treshold']"),
    ],
)
def test_bad_requests_get_one_clear_error(saved_folder, data, message):
    with pytest.raises(ValueError) as error:
        EndpointHandler(str(saved_folder))(data)
    assert message in str(error.value)


def test_handler_loads_and_scores_without_mrad_hf(saved_folder, tmp_path):
    image = make_samples(1, seed=3)[0]["image"]
    expected_score, _ = _expected(saved_folder, image)
    (tmp_path / "part.png").write_bytes(_png_bytes(image))
    script = f"""
        import base64, importlib.util, json, sys
        sys.modules["mrad_hf"] = None  # any `import mrad_hf` now fails, as on an endpoint without the package
        spec = importlib.util.spec_from_file_location("handler", {str(saved_folder / "handler.py")!r})
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        handler = module.EndpointHandler({str(saved_folder)!r})
        assert not any(name == "mrad_hf" or name.startswith("mrad_hf.") for name in sys.modules if sys.modules[name] is not None)
        [response] = handler({{"inputs": base64.b64encode(open("part.png", "rb").read()).decode(), "parameters": {{"threshold": 0.0}}}})
        print(json.dumps({{"score": response["score"], "label": response["label"], "model": type(handler.model).__module__}}))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout.strip().splitlines()[-1])
    assert response["score"] == pytest.approx(expected_score, abs=1e-6) and response["label"] == "anomaly"
    assert not response["model"].startswith("mrad_hf")  # the repo's own remote code ran
