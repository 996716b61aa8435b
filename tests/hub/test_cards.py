# SPDX-License-Identifier: Apache-2.0
"""Model and bank cards: rendered for every variant and auxiliary setting, parsed back with huggingface_hub
(`ModelCard`, `metadata_load`, `model_index_to_eval_results`), model-index filled from a real `mrad evaluate`
results.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_samples
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from mrad_hf.hub.api import eval_results_from_json, render_bank_card, render_model_card
from mrad_hf.hub.cards import main as render_main
from mrad_hf.memory import build_memory_bank

VARIANTS = ("tf", "ft", "clip")


@pytest.fixture(scope="module")
def results_json(tmp_path_factory):
    """A results.json written by the evaluation runner itself (tiny random model, pretend-pretrained run)."""
    from conftest import make_tiny_model
    from datasets import Dataset

    from mrad_hf.evaluation.runner import evaluate_dataset

    folder = tmp_path_factory.mktemp("eval")
    rows = []
    for index, sample in enumerate(make_samples(6, seed=2)):
        image_path = folder / f"img{index}.png"
        Image.fromarray(sample["image"]).save(image_path)
        mask_path = None
        if sample["mask"] is not None:
            mask_path = str(folder / f"img{index}_mask.png")
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(mask_path)
        rows.append(
            {
                "image": str(image_path),
                "mask": mask_path,
                "label": sample["label"],
                "category": "widget",
                "defect_type": "good" if sample["label"] == 0 else "cut",
                "path": str(image_path),
            }
        )
    model = make_tiny_model()
    build_memory_bank(model, make_samples(4, seed=9), progress=False, source="visa")
    evaluate_dataset(
        model,
        Dataset.from_list(rows),
        folder / "run",
        name="mvtec",
        heatmaps_per_category=0,
        progress=False,
        run_info={"model": "test", "pretrained": True, "bank": "visa"},
    )
    return folder / "run" / "results.json"


def _config(variant, auxiliary):
    from mrad_hf.hub.cards import card_config

    return card_config(variant, auxiliary)


@pytest.mark.parametrize("auxiliary", ["visa", "mvtec"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_card_per_variant_parses_back(tmp_path, results_json, variant, auxiliary):
    repo_id = f"mrad-hf/mrad-{variant}-{auxiliary}"
    card = render_model_card(_config(variant, auxiliary), repo_id=repo_id, results=[results_json])
    path = tmp_path / "README.md"
    card.save(path)

    metadata = metadata_load(path)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "other"
    assert {"anomaly-detection", "zero-shot-anomaly-detection", "mrad", "clip", f"mrad-{variant}"} <= set(
        metadata["tags"]
    )
    assert metadata["base_model"] == "openai/clip-vit-large-patch14-336"
    assert metadata["datasets"] == [auxiliary]
    assert metadata["license"] == {"visa": "cc-by-4.0", "mvtec": "cc-by-nc-sa-4.0"}[auxiliary]

    mean = json.loads(results_json.read_text())["mean"]
    _, parsed = model_index_to_eval_results(metadata["model-index"])
    values = {entry.metric_type: entry.metric_value for entry in parsed}
    assert values == {key: round(100 * value, 2) for key, value in mean.items() if value is not None}
    assert {entry.dataset_type for entry in parsed} == {"mvtec"} and {entry.dataset_name for entry in parsed} == {
        "MVTec AD"
    }
    assert metadata["model-index"][0]["name"] == f"mrad-{variant}-{auxiliary}"

    reloaded = ModelCard.load(path)  # the whole card, text and metadata, through huggingface_hub's parser
    assert reloaded.data.eval_results == card.data.eval_results
    title = {"tf": "MRAD-TF", "ft": "MRAD-FT", "clip": "MRAD-CLIP"}[variant]
    assert f"# {title} (memory from {'VisA' if auxiliary == 'visa' else 'MVTec AD'})" in reloaded.text
    assert f'pipeline("anomaly-detection", model="{repo_id}")' in reloaded.text
    assert (
        "## Intended use and limits" in reloaded.text
        and "CC BY-NC-SA 4.0" in reloaded.text
        and "Apache-2.0" in reloaded.text
    )
    assert f"| MVTec AD | {100 * mean['image_auroc']:.1f} |" in reloaded.text
    assert ("non-commercial use only**, share-alike" in reloaded.text) == (auxiliary == "mvtec")


def test_card_without_results_and_random_backbone_refusal(results_json, tmp_path):
    card = render_model_card(_config("tf", "visa"), repo_id="o/m")
    assert "model-index" not in card.content and "No evaluation results are attached" in card.text
    random_run = json.loads(results_json.read_text())
    random_run["run"]["pretrained"] = False
    with pytest.raises(ValueError, match="randomly initialised backbone"):
        eval_results_from_json(random_run)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*results.json written by `mrad evaluate`"):
        render_model_card(_config("tf", "visa"), repo_id="o/m", results=tmp_path / "bad.json")


def test_render_script_writes_a_valid_card(tmp_path, results_json, capsys):
    output = tmp_path / "card" / "README.md"
    argv = [
        "--variant",
        "clip",
        "--auxiliary",
        "mvtec",
        "--repo-id",
        "o/mrad-clip-mvtec",
        "--results",
        str(results_json),
        "--output",
        str(output),
    ]
    assert render_main(argv) == 0
    count = sum(value is not None for value in json.loads(results_json.read_text())["mean"].values())
    assert f"({count} evaluation results in model-index)" in capsys.readouterr().out
    metadata = metadata_load(output)
    assert metadata["license"] == "cc-by-nc-sa-4.0" and "mrad-clip" in metadata["tags"]
    assert len(model_index_to_eval_results(metadata["model-index"])[1]) >= 1


def test_bank_card_parses_back(model_with_bank, tmp_path):
    bank = model_with_bank.get_memory_bank()
    card = render_bank_card(bank, repo_id="o/bank")
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "mrad-hf" and "memory-bank" in metadata["tags"]
    counts = bank.counts()
    assert f"Image memory: {counts['image_entries']} keys, {counts['image_anomalous']} anomalous" in card.text
    assert str(bank.metadata["backbone"]["weights_signature"][:5]) in card.text
