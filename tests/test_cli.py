# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command: build-bank and predict on a user folder, bad files skipped, clear one-line errors."""

import json

import numpy as np
import pytest
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf import MemoryBank, MRADImageProcessor
from mrad_hf.cli import main


@pytest.fixture
def user_folder(tmp_path):
    """The documented generic layout: good/, <defect>/ with <stem>_mask.png beside the image."""
    root = tmp_path / "widget"
    for index, sample in enumerate(make_samples(6, seed=21)):
        folder = root / ("scratch" if sample["label"] else "good")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{index:03d}.png")
        if sample["mask"] is not None:
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(folder / f"{index:03d}_mask.png")
    return root


@pytest.fixture
def saved_tiny(tmp_path):
    path = tmp_path / "tiny"
    make_tiny_model().save_pretrained(path)
    return path


def test_build_bank_then_predict_with_a_bad_file(user_folder, saved_tiny, tmp_path, capsys):
    bank_path, model_dir = tmp_path / "bank.safetensors", tmp_path / "with_bank"
    code = main(["build-bank", "--model", str(saved_tiny), "--dataset", "folder", "--data-root", str(user_folder),
                 "--output", str(bank_path), "--save-model", str(model_dir), "--batch-size", "4"])
    assert code == 0
    bank = MemoryBank.load(bank_path)
    assert bank.counts()["image_entries"] == 6 and bank.counts()["patch_anomalous"] == 3
    assert bank.metadata["source"] == "folder"

    queries = tmp_path / "queries"
    queries.mkdir()
    query_images = [s["image"] for s in make_samples(3, seed=22)]
    for index, image in enumerate(query_images):
        Image.fromarray(image).save(queries / f"q{index}.png")
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_dir), str(queries), "--output-dir", str(out), "--threshold", "0.5"]) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 3 and summary["failed"] == 1
    failure = summary["failures"][0]
    assert failure["path"].endswith("broken.png") and "broken.png" in failure["error"]
    # scores equal the model's own
    from mrad_hf import MRADForAnomalyDetection

    model = MRADForAnomalyDetection.from_pretrained(model_dir)
    processor = MRADImageProcessor.from_config(model.config)
    expected = model(**processor(query_images)).anomaly_score.tolist()
    assert [r["score"] for r in summary["results"]] == pytest.approx(expected, abs=1e-6)
    assert all(r["label"] in ("anomaly", "normal") for r in summary["results"])
    panel = Image.open(summary["results"][0]["heatmap"])
    assert panel.size[0] == 2 * 120 and panel.mode == "RGB"

    assert main(["predict", "--model", str(model_dir), str(queries), "--output-dir", str(out), "--on-error", "fail"]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", "--clip", "random-small", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrad predict: error:") and "neither an image file nor a folder" in err
    assert main(["build-bank", "--dataset", "mvtec", "--data-root", str(tmp_path), "--output", str(tmp_path / "b.safetensors")]) == 2
    assert "Pass --model" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    """The README's main job: synthetic benchmark -> bank -> scores, AUROCs and heatmap PNGs, honest about weights."""
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED CLIP" in printed and "Retrieval temperature: 0.01" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert results["pretrained"] is False and results["protocol"] == "held-out-images"
    scores = results["scores"]
    assert results["image_auroc"] == pytest.approx(roc_auc_score([s["label"] for s in scores], [s["score"] for s in scores]))
    assert results["pixel_auroc"] > 0.75  # retrieval localises the pasted defects (measured 0.95)
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == len(scores) and Image.open(heatmaps[0]).size == (3 * 256, 256 + 18)
    assert MemoryBank.load(out / "memory_bank.safetensors").counts()["image_entries"] == len(scores)
