# SPDX-License-Identifier: Apache-2.0
"""Explanations: the listed entries are the true top-k by the similarity the score uses, with provenance; the panel."""

import numpy as np
import pytest
import torch
from conftest import make_samples
from PIL import Image
from transformers import pipeline

from mrad_hf import MRADImageProcessor
from mrad_hf.tools.explain import explain_images, render_explanation, save_explanation


@pytest.fixture
def queries(model_with_bank):
    images = [s["image"] for s in make_samples(3, seed=31)]
    return MRADImageProcessor.from_config(model_with_bank.config)(images)["pixel_values"]


def test_entries_are_the_true_top_k_by_the_scoring_similarity(model_with_bank, queries):
    model, top_k = model_with_bank, 4
    explanations = explain_images(model, queries, top_k=top_k)
    with torch.no_grad():
        outputs = model(pixel_values=queries)
        image_queries, patch_queries = model.retrieval_queries(model.extract_features(queries))
        image_logits = model.retrieval_logits("image", image_queries)
    # these logits are the score's: their softmax over the memory values is the model's image probability
    torch.testing.assert_close(torch.softmax(image_logits, -1) @ model.memory.image_values, outputs.image_probabilities)
    bank = model.get_memory_bank()
    for b, explanation in enumerate(explanations):
        order = torch.argsort(image_logits[b], descending=True)[:top_k].tolist()
        neighbours = explanation["image"]["neighbours"]
        assert [n["index"] for n in neighbours] == order
        assert [n["similarity"] for n in neighbours] == pytest.approx(image_logits[b, order].tolist(), abs=1e-6)
        weights = torch.softmax(image_logits[b], -1)[order]
        assert [n["weight"] for n in neighbours] == pytest.approx(weights.tolist(), abs=1e-6)
        assert all(n["image_id"] == bank.image_ids()[n["index"]] and n["source"] == "unit-test" for n in neighbours)
        # the region: the patch with the highest anomaly probability, and its own top-k prototypes
        region = explanation["region"]
        patch = int(outputs.patch_probabilities[b, :, 1].argmax())
        assert region["patch_index"] == patch and divmod(patch, region["grid_size"]) == (region["row"], region["col"])
        assert region["p_anomaly"] == pytest.approx(float(outputs.patch_probabilities[b, patch, 1]))
        patch_logits = model.retrieval_logits("patch", patch_queries[b, patch])
        order = torch.argsort(patch_logits, descending=True)[:top_k].tolist()
        assert [n["index"] for n in region["neighbours"]] == order
        assert [n for n in region["neighbours"]] == [
            {**bank.provenance("patch", i), "rank": r + 1, "similarity": pytest.approx(float(patch_logits[i]), abs=1e-6),
             "weight": pytest.approx(float(torch.softmax(patch_logits, -1)[i]), abs=1e-6)}
            for r, i in enumerate(order)
        ]
        assert explanation["score"] == pytest.approx(float(outputs.anomaly_score[b]))


def test_pipeline_explain_batched_equals_single(model_with_bank):
    detect = pipeline("anomaly-detection", model=model_with_bank, image_processor=MRADImageProcessor.from_config(model_with_bank.config), device="cpu")
    images = [s["image"] for s in make_samples(3, seed=32)]
    singles = [detect(image, explain=True, top_k=2)["explanation"] for image in images]
    batched = [r["explanation"] for r in detect(images, explain=True, top_k=2, batch_size=2)]
    for one, many in zip(singles, batched):  # batching changes float rounding only
        for level in ("image", "region"):
            assert [n["index"] for n in many[level]["neighbours"]] == [n["index"] for n in one[level]["neighbours"]]
            assert [n["similarity"] for n in many[level]["neighbours"]] == pytest.approx([n["similarity"] for n in one[level]["neighbours"]], abs=1e-5)
    assert [e["region"]["patch_index"] for e in batched] == [e["region"]["patch_index"] for e in singles]
    assert len(singles[0]["image"]["neighbours"]) == 2
    assert "explanation" not in detect(images[0])
    with pytest.raises(ValueError, match="top_k is the number of memory entries"):
        detect(images[0], explain=True, top_k=0)


def test_panel_shows_source_thumbnails_and_placeholders(tiny_model, tmp_path):
    rows = make_samples(4, seed=33)
    for index, row in enumerate(rows[:2]):  # the first two entries come from files, the others have no file
        row["id"] = str(tmp_path / f"aux{index}.png")
        Image.fromarray(row["image"]).save(row["id"])
    tiny_model.build_memory_bank(rows, source="files", progress=False)
    query = MRADImageProcessor.from_config(tiny_model.config)(rows[0]["image"])["pixel_values"]
    explanation = explain_images(tiny_model, query, top_k=4)[0]
    tile, gap, strip = 96, 4, 18
    anomaly_map = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    path = save_explanation(tmp_path / "panel.png", Image.fromarray(rows[0]["image"]), anomaly_map, explanation, tile=tile)
    panel = np.asarray(Image.open(path).convert("RGB"))
    assert panel.shape[1] == 4 * (tile + gap) + gap
    top = strip + strip + tile + strip  # header, row-1 label, query tiles, row-2 label
    for rank, entry in enumerate(explanation["image"]["neighbours"]):
        left = gap + rank * (tile + gap)
        inside = panel[top + 10 : top + tile - 10, left + 10 : left + tile - 10].astype(int)
        if entry["image_index"] < 2:
            expected = np.asarray(Image.fromarray(rows[entry["image_index"]]["image"]).resize((tile, tile), Image.Resampling.BILINEAR))
            assert np.abs(inside - expected[10:-10, 10:-10].astype(int)).max() <= 1
        else:  # placeholder: flat grey except its caption text
            assert (np.all(inside == 225, axis=-1)).mean() > 0.9
    assert render_explanation(Image.fromarray(rows[1]["image"]), anomaly_map, explanation).size[0] == 4 * (160 + gap) + gap
