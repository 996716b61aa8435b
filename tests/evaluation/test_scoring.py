# SPDX-License-Identifier: Apache-2.0
"""The batched-scoring loop: equal to the model's own forward, per-item errors, workers, two processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_samples, make_tiny_model, run_two_processes_and_one
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mrad_hf import MRADImageProcessor, MRADInputError
from mrad_hf.evaluation.scoring import score_items
from mrad_hf.memory import build_memory_bank


@pytest.fixture(scope="module")
def scored_model():
    model = make_tiny_model()
    build_memory_bank(model, make_samples(6), batch_size=3, progress=False)
    return model


def _write_images(folder: Path, samples) -> list[str]:
    paths = []
    for index, sample in enumerate(samples):
        path = folder / f"image{index}.png"
        Image.fromarray(sample["image"]).save(path)
        paths.append(str(path))
    return paths


@torch.no_grad()
def test_scores_and_maps_equal_the_models_forward_in_input_order(scored_model, tmp_path):
    samples = make_samples(5, seed=2)
    paths = _write_images(tmp_path, samples)
    expected = scored_model(**MRADImageProcessor.from_config(scored_model.config)(paths))
    for batch_size, workers in ((2, 0), (4, 2)):
        results = score_items(scored_model, paths, batch_size=batch_size, num_workers=workers)
        assert [r.index for r in results] == list(range(5)) and [r.id for r in results] == paths
        assert all(r.error is None and r.original_size == (100, 120) for r in results)
        torch.testing.assert_close(torch.tensor([r.score for r in results]), expected.anomaly_score, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            torch.stack([r.anomaly_map for r in results]), expected.anomaly_map, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor([r.image_probability for r in results]), expected.image_probabilities[:, 1], atol=1e-6, rtol=0
        )


def test_a_bad_file_is_that_items_failure(scored_model, tmp_path):
    paths = _write_images(tmp_path, make_samples(3, seed=5))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = [paths[0], str(broken), paths[1], str(tmp_path / "missing.png"), paths[2]]
    results = score_items(scored_model, items, batch_size=2, num_workers=1)
    assert [r.error is None for r in results] == [True, False, True, False, True]
    assert "broken.png" in results[1].error and results[1].score is None and "\n" not in results[1].error
    assert "missing.png" in results[3].error
    alone = score_items(scored_model, paths, batch_size=3)
    torch.testing.assert_close(
        torch.tensor([results[i].score for i in (0, 2, 4)]), torch.tensor([r.score for r in alone]), atol=1e-5, rtol=0
    )
    with pytest.raises(MRADInputError, match="broken.png"):
        score_items(scored_model, items, batch_size=2, on_error="fail")
    with pytest.raises(ValueError, match="on_error"):
        score_items(scored_model, items, on_error="ignore")


def test_out_of_memory_for_a_batch_scores_its_images_one_by_one(scored_model, monkeypatch):
    """A batch that does not fit (MemoryError) is scored image by image; an image that does not fit alone is that
    item's failure (with on_error="skip"), and the run goes on."""
    samples = make_samples(4, seed=5)
    expected = score_items(scored_model, samples, batch_size=4, keep_maps=False)
    forward, poisoned = type(scored_model).forward, samples[2]["image"]
    processor = MRADImageProcessor.from_config(scored_model.config)
    poisoned_pixels = processor([poisoned], return_tensors="pt")["pixel_values"]

    def forward_with_little_memory(pixel_values=None, **kwargs):
        if pixel_values.shape[0] > 1 or torch.equal(pixel_values, poisoned_pixels):
            raise MemoryError()
        return forward(scored_model, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(scored_model, "forward", forward_with_little_memory)
    for batch_size in (4, 1):  # a batch that does not fit, and one image per batch
        results = score_items(scored_model, samples, batch_size=batch_size, keep_maps=True, on_error="skip")
        assert [r.error is None for r in results] == [True, True, False, True]
        assert "out of memory even alone (MemoryError)" in results[2].error
        for got, want in zip(results, expected):
            if got.error is None:
                assert got.score == pytest.approx(want.score, abs=1e-6) and got.anomaly_map is not None


def test_labels_masks_and_scores_only(scored_model):
    samples = make_samples(4, seed=6)
    results = score_items(scored_model, samples, batch_size=3, keep_maps=False)
    assert [r.label for r in results] == [0, 1, 0, 1] and [r.id for r in results] == [s["id"] for s in samples]
    assert all(r.anomaly_map is None for r in results)
    assert results[0].mask.sum() == 0 and results[1].mask.sum() > 0 and results[1].mask.shape == (112, 112)
    expected = MRADImageProcessor.from_config(scored_model.config)(
        [s["image"] for s in samples], masks=[s["mask"] for s in samples]
    )["masks"]
    assert torch.equal(torch.stack([r.mask for r in results]), expected)


def test_two_processes_give_the_results_of_one(tmp_path):
    script = Path(__file__).with_name("two_process_scoring.py")
    run_two_processes_and_one(script, tmp_path / "two.safetensors", tmp_path / "one.safetensors", accelerate=False)
    one, two = (load_file(tmp_path / f"{name}.safetensors") for name in ("one", "two"))
    ids = [json.loads(safe_open(tmp_path / f"{name}.safetensors", "pt").metadata()["ids"]) for name in ("one", "two")]
    assert ids[0] == ids[1] and len(ids[0]) == 7
    # the same batches of 2 in both runs (4 batches split 2 + 2), so the same bits
    assert torch.equal(one["scores"], two["scores"])
    assert torch.equal(one["maps"], two["maps"])
    assert np.isfinite(one["scores"].numpy()).all()
