# SPDX-License-Identifier: Apache-2.0
"""The demo app, driven through gradio_client like a user's browser: upload an image, get the pipeline's score."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import make_samples
from PIL import Image

from mrad_hf.memory import build_memory_bank
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
        score, decision, overlay, panel, details = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(path)), api_name="/predict"
        )
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


# ---------------------------------------------------------------- what a client can reach (issue 13 §2, §5)
def test_client_sees_the_real_error_uploads_are_capped_and_the_temp_folder_is_removed(model_with_bank, tmp_path):
    from gradio_client import Client, handle_file

    good = tmp_path / "part.png"
    Image.fromarray(make_samples(1, seed=43, height=80, width=96)[0]["image"]).save(good)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    big = tmp_path / "big.png"
    big.write_bytes(good.read_bytes() + b"\0" * 60_000)  # over a 50 KB cap
    app = build_app(model_with_bank, top_k=2, max_upload_mb=0.05)
    temp_dir = Path(app.temp_dir)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_options)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        score = client.predict(handle_file(str(good)), api_name="/predict")[0]
        assert 0.0 <= score <= 1.0
        assert any(temp_dir.rglob("part.png"))  # uploads land in the app's own folder
        with pytest.raises(
            Exception, match="Image file 'notes.png' is not a readable image"
        ) as error:  # MRAD's message
            client.predict(handle_file(str(not_an_image)), api_name="/predict")
        assert str(temp_dir) not in str(error.value)
        with pytest.raises(Exception, match="(?i)file size|too large|exceeds|limit"):
            client.predict(handle_file(str(big)), api_name="/predict")
    finally:
        app.close()
    assert not temp_dir.exists()
    assert os.environ.get("GRADIO_TEMP_DIR") == str(temp_dir)


def test_analyse_refuses_an_oversized_file_before_decoding(model_with_bank, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(make_samples(1, seed=44)[0]["image"]).save(path)
    with pytest.raises(ValueError, match=r"The upload is 0\.0 MB; this app accepts images up to 1e-05 MB"):
        analyse(detector_for(model_with_bank), str(path), max_upload_mb=1e-5)


def test_details_name_no_server_path_and_thumbnails_come_only_from_the_root(tiny_model, tmp_path):
    import json

    rows = make_samples(4, seed=45)
    (tmp_path / "served").mkdir()
    for index, row in enumerate(rows):  # private images on the serving machine
        Image.fromarray(row["image"]).save(tmp_path / f"private_{index}.png")
    build_memory_bank(tiny_model, rows, source="aux", progress=False)
    # a bank whose ids are absolute paths there (banks built here never store them; one from elsewhere may)
    bank = tiny_model.get_memory_bank()
    bank.metadata["image_ids"] = [str(tmp_path / f"private_{index}.png") for index in range(len(rows))]
    tiny_model.set_memory_bank(bank)
    score, decision, overlay, panel, details = analyse(
        detector_for(tiny_model), rows[0]["image"], top_k=3, image_root=tmp_path / "served"
    )
    text = json.dumps(details)
    assert str(tmp_path) not in text and "private_" in text  # file names only
    assert all(n["image_id_redacted"] for n in details["explanation"]["image"]["neighbours"])
    assert set(details["thumbnail_notes"]) == {"absolute image id, not read"}
