# SPDX-License-Identifier: Apache-2.0
"""`mrad evaluate` on a user's folders: explicit --normal-dir/--abnormal-dir/--mask-dir, one-class refusal,
leakage warning and --exclude-bank-images (issue 12 §2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf.cli.main import main
from mrad_hf.data.loaders import load_benchmark
from mrad_hf.memory import build_memory_bank, save_bank


@pytest.fixture
def textile(tmp_path):
    """conformal-clip-data style: normals in nominal/, defects in hole_a/ and hole_b/, masks in annotations/."""
    root = tmp_path / "textile"
    for index, sample in enumerate(make_samples(12, seed=9)):
        if sample["mask"] is None:
            folder = root / "nominal"
        else:
            folder = root / ("hole_a" if index % 4 == 1 else "hole_b")
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(root / "annotations" / f"{sample['id']}.png")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{sample['id']}.png")
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "model")
    memory = load_benchmark(
        "folder", root, normal_dirs=["nominal"], abnormal_dirs=["hole_*"], mask_dirs=["annotations"]
    )
    memory = memory.filter(
        lambda row_id: row_id.endswith(("img0.png", "img1.png", "img2.png", "img3.png")), input_columns="id"
    )
    save_bank(build_memory_bank(model, memory, source="folder", progress=False), tmp_path / "bank.safetensors")
    return tmp_path, root


def evaluate(tmp_path, root, out, *extra):
    return main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--bank",
            str(tmp_path / "bank.safetensors"),
            "--dataset",
            "folder",
            "--data-root",
            str(root),
            "--output-dir",
            str(tmp_path / out),
            "--heatmaps",
            "0",
            *extra,
        ]
    )


def test_explicit_folders_with_leakage_warning_and_exclusion(textile, capsys):
    tmp_path, root = textile
    folders = ["--normal-dir", "nominal", "--abnormal-dir", "hole_*", "--mask-dir", "annotations"]
    assert evaluate(tmp_path, root, "all", *folders) == 0
    out = capsys.readouterr().out
    assert "LEAKAGE: 4 of 12 scored images are in the memory bank" in out and "--exclude-bank-images" in out
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["bank_overlap"]["images"] == 4 and results["per_category"][0]["images"] == 12
    assert results["per_category"][0]["anomalous"] == 6 and results["mean"]["image_auroc"] is not None
    assert evaluate(tmp_path, root, "clean", *folders, "--exclude-bank-images") == 0
    assert "Left out 4 of 12 scored images that are in the memory bank" in capsys.readouterr().out
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert clean["per_category"][0]["images"] == 8 and clean["bank_overlap"]["excluded"] is True


def test_nominal_folder_is_normal_in_the_generic_layout(textile, capsys):
    tmp_path, root = textile
    (root / "annotations").rename(root / "masks")  # the generic layout's flat mask folder
    assert evaluate(tmp_path, root, "generic") == 0
    results = json.loads((tmp_path / "generic" / "results.json").read_text())
    assert results["per_category"][0]["anomalous"] == 6 and results["per_category"][0]["images"] == 12
    assert results["mean"]["image_auroc"] is not None  # before: every image anomalous, every metric "-", exit 0
    assert results["mean"]["pixel_auroc"] is not None and results["pixel_excluded_images"] == 0


def test_one_class_dataset_exits_2_with_the_fix(textile, capsys):
    tmp_path, root = textile
    assert evaluate(tmp_path, root, "bad", "--abnormal-dir", "hole_*") == 2
    err = capsys.readouterr().err
    assert "all 6 images are labelled anomalous" in err and "--normal-dir" in err


def test_explicit_folders_only_with_dataset_folder(textile, capsys):
    tmp_path, root = textile
    args = [
        "evaluate",
        "--model",
        str(tmp_path / "model"),
        "--bank",
        str(tmp_path / "bank.safetensors"),
        "--dataset",
        "mvtec",
        "--data-root",
        str(root),
        "--normal-dir",
        "nominal",
        "--output-dir",
        str(tmp_path / "x"),
    ]
    assert main(args) == 2
    assert "use them with --dataset folder" in capsys.readouterr().err
