# SPDX-License-Identifier: Apache-2.0
"""The evaluation runner on data that is not clean: unmasked anomalies, one-class sets, leakage, bad values
(issue 12 §2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf.data.loaders import load_folder
from mrad_hf.evaluation.metrics import compute_all_metrics, pixel_ap, pixel_auroc
from mrad_hf.evaluation.runner import (
    BankOverlapWarning,
    EvaluationDataError,
    bank_overlap,
    evaluate_dataset,
    file_sha256,
)
from mrad_hf.memory import build_memory_bank


def test_pixel_images_leaves_unmasked_anomalies_out_with_numbers():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[1, 2:8, 3:9] = masks[3, 9:14, 1:6] = True  # images 1 and 3: anomalous with masks
    maps = rng.random((6, 16, 16))
    maps[masks] += 0.5
    maps[5, 4:10, 4:10] += 0.8  # image 5: anomalous, mask unknown (stored as all zeros)
    labels, scores = [0, 1, 0, 1, 0, 1], rng.random(6)
    known = np.array([True, True, True, True, True, False])
    excluded = compute_all_metrics(labels, scores, masks, maps, pixel_images=known)
    subset = compute_all_metrics(labels, scores, masks[known], maps[known])
    counted_as_normal = compute_all_metrics(labels, scores, masks, maps)
    assert excluded["pixel_auroc"] == pytest.approx(pixel_auroc(masks[known], maps[known]), abs=1e-12)
    assert excluded["pixel_ap"] == pytest.approx(pixel_ap(masks[known], maps[known]), abs=1e-12)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert excluded[key] == pytest.approx(subset[key], abs=1e-12)
    # counting the unmasked anomaly as all-normal pixels lowers both numbers (its hot region becomes false positives)
    assert counted_as_normal["pixel_auroc"] < excluded["pixel_auroc"] - 1e-3
    assert counted_as_normal["pixel_ap"] < excluded["pixel_ap"] - 1e-3
    assert excluded["image_auroc"] == counted_as_normal["image_auroc"]  # image metrics use every image
    with pytest.raises(ValueError, match="pixel_images must be a bool array"):
        compute_all_metrics(labels, scores, masks, maps, pixel_images=[1, 0])


def write_folder(root, samples, *, unmasked=()):
    """`root/good/*.png` and `root/defect/*.png` with masks in `root/masks/defect/` except for ids in `unmasked`."""
    for sample in samples:
        folder = root / ("good" if sample["mask"] is None else "defect")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{sample['id']}.png")
        if sample["mask"] is not None and sample["id"] not in unmasked:
            (root / "masks" / "defect").mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(
                root / "masks" / "defect" / f"{sample['id']}.png"
            )


@pytest.fixture
def scored_model():
    model = make_tiny_model(batch_invariant=True)  # the subset/full comparison below is bit-for-bit
    build_memory_bank(model, make_samples(6, seed=3), batch_size=6, source="aux", progress=False)
    return model


def test_runner_excludes_unmasked_anomalies_from_pixel_metrics(scored_model, tmp_path):
    samples = make_samples(10, seed=7)
    write_folder(tmp_path / "part", samples, unmasked={"img5"})
    dataset = load_folder(tmp_path / "part")
    assert dataset["mask_path"][list(dataset["id"]).index("defect/img5.png")] is None
    full = evaluate_dataset(
        scored_model, dataset, tmp_path / "full", name="part", progress=False, heatmaps_per_category=0
    )
    masked_only = dataset.filter(lambda row_id: row_id != "defect/img5.png", input_columns="id")
    subset = evaluate_dataset(
        scored_model, masked_only, tmp_path / "subset", name="part", progress=False, heatmaps_per_category=0
    )
    assert full["per_category"][0]["pixel_excluded"] == 1 and full["pixel_excluded_images"] == 1
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert full["mean"][key] == pytest.approx(subset["mean"][key], abs=1e-12)
    assert full["per_category"][0]["images"] == 10  # the image is still scored for the image metrics
    table = (tmp_path / "full" / "results.md").read_text()
    assert "no mask" in table.splitlines()[0] and "leave out 1 anomalous image(s) without a ground-truth mask" in table
    assert json.loads((tmp_path / "full" / "results.json").read_text())["pixel_excluded_images"] == 1
    assert "no mask" not in (tmp_path / "subset" / "results.md").read_text()


def test_one_class_dataset_is_an_error_with_the_fix(scored_model, tmp_path):
    """The textile layout with normals in a folder the loader did not know: everything anomalous."""
    for name in ("unknown_normals", "hole"):
        (tmp_path / "fabric" / name).mkdir(parents=True)
        Image.fromarray(make_samples(1)[0]["image"]).save(tmp_path / "fabric" / name / "a.png")
    dataset = load_folder(tmp_path / "fabric")
    with pytest.raises(
        EvaluationDataError,
        match=r"all 2 images are labelled anomalous.*good/, normal/, nominal/ or ok/.*--normal-dir",
    ):
        evaluate_dataset(scored_model, dataset, tmp_path / "out", name="fabric", progress=False)
    (tmp_path / "fabric" / "unknown_normals").rename(tmp_path / "fabric" / "good")
    normals = load_folder(tmp_path / "fabric").filter(lambda label: label == 0, input_columns="label")
    with pytest.raises(EvaluationDataError, match="labelled normal.*--abnormal-dir"):
        evaluate_dataset(scored_model, normals, tmp_path / "out", name="fabric", progress=False)


def test_leakage_is_counted_warned_and_excludable(tmp_path):
    samples = make_samples(8, seed=11)
    write_folder(tmp_path / "part", samples)
    dataset = load_folder(tmp_path / "part")
    model = make_tiny_model()
    in_bank = dataset.select(range(0, 8, 2))  # 4 of the 8 scored images also fill the memory
    build_memory_bank(model, in_bank, batch_size=4, source="folder", progress=False)
    hits, how = bank_overlap(dataset, model.memory_bank_metadata)
    assert sorted(hits) == [0, 2, 4, 6]
    with pytest.warns(BankOverlapWarning, match=r"LEAKAGE: 4 of 8 scored images are in the memory bank"):
        results = evaluate_dataset(
            model, dataset, tmp_path / "a", name="folder", progress=False, heatmaps_per_category=0
        )
    assert results["bank_overlap"]["images"] == 4 and not results["bank_overlap"]["excluded"]
    with pytest.warns(BankOverlapWarning, match="Left out 4 of 8"):
        kept = evaluate_dataset(
            model,
            dataset,
            tmp_path / "b",
            name="folder",
            progress=False,
            heatmaps_per_category=0,
            exclude_bank_images=True,
        )
    assert sum(r["images"] for r in kept["per_category"]) == 4 and kept["bank_overlap"]["excluded"]


def test_leakage_by_content_hash_finds_copies_under_other_names(tmp_path):
    samples = make_samples(6, seed=12)
    write_folder(tmp_path / "part", samples)
    dataset = load_folder(tmp_path / "part")
    copy = tmp_path / "copy.png"
    copy.write_bytes((tmp_path / "part" / "good" / "img0.png").read_bytes())
    metadata = {"image_ids": ["elsewhere/x.png"], "image_sources": ["other"], "image_sha256": [file_sha256(copy)]}
    hits, how = bank_overlap(dataset, metadata)
    assert hits == [list(dataset["id"]).index("good/img0.png")] and how == "content (sha256)"
    assert (
        bank_overlap(dataset, {"image_ids": ["good/img0.png"], "image_sources": ["other-dataset"]})[0] == []
    )  # same id, other data
    assert bank_overlap(dataset, {"image_ids": [dataset["path"][0]]})[0] == [0]  # old banks stored absolute paths


def test_api_values_are_validated(scored_model, tmp_path):
    write_folder(tmp_path / "part", make_samples(4, seed=1))
    dataset = load_folder(tmp_path / "part")
    for value in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
            evaluate_dataset(scored_model, dataset, tmp_path / "o", batch_size=value, progress=False)
    with pytest.raises(ValueError, match="heatmaps_per_category"):
        evaluate_dataset(scored_model, dataset, tmp_path / "o", heatmaps_per_category=-1, progress=False)
    with pytest.raises(ValueError, match="on_error"):
        evaluate_dataset(scored_model, dataset, tmp_path / "o", on_error="ignore", progress=False)
