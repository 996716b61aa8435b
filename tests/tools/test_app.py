# SPDX-License-Identifier: Apache-2.0
"""The demo app, driven through gradio_client like a user's browser: upload an image, get the pipeline's score."""

import os
import socket

import numpy as np
import pytest
from conftest import make_samples
from PIL import Image

from mrad_hf.tools.app import analyse, build_app, detector_for

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_uploaded_image_gets_the_pipeline_score(model_with_bank, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "part.png"
    Image.fromarray(make_samples(1, seed=41, height=80, width=96)[0]["image"]).save(path)
    expected = detector_for(model_with_bank)(str(path))["score"]
    app = build_app(model_with_bank, top_k=3)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        score, decision, overlay, panel, details = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(str(path)), api_name="/predict")
    finally:
        app.close()
    assert score == pytest.approx(expected, abs=1e-6)
    assert details["score"] == pytest.approx(expected, abs=1e-6)
    assert len(details["explanation"]["image"]["neighbours"]) == 3
    assert decision.startswith("no decision")  # not calibrated
    assert Image.open(overlay).size == (96, 80)
    assert Image.open(panel).size[0] > 3 * 160


def test_analyse_decides_with_a_threshold(model_with_bank):
    image = make_samples(1, seed=42)[0]["image"]
    detector = detector_for(model_with_bank)
    score, decision, overlay, panel, details = analyse(detector, image, top_k=2, threshold=0.0)
    assert details["is_anomalous"] is True and decision.startswith("ANOMALOUS")
    assert details["thresholds"] == {"image": 0.0, "pixel": 0.0, "from": "arguments"}
    assert np.asarray(overlay).shape == (100, 120, 3)
    with pytest.raises(ValueError, match="No image"):
        analyse(detector, None)


def test_missing_gradio_gives_the_install_command(monkeypatch):
    import sys

    from mrad_hf.tools.app import import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # what an environment without the extra looks like
    with pytest.raises(ImportError, match=r'pip install "mrad-hf\[app\]"'):
        import_gradio()
