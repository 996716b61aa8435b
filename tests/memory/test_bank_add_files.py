# SPDX-License-Identifier: Apache-2.0
"""`mrad bank add --images ... --label anomaly`: masks paired as the folder loader does, no normal region from an
unmasked anomaly, the output says so (issue 12 §2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_samples
from PIL import Image

from mrad_hf.cli.main import main
from mrad_hf.memory import load_bank, save_bank
from mrad_hf.memory.tools import add_samples, entries_from_samples, samples_from_files


def save_line(folder, count=4, seed=51, masks=True):
    """Anomalous images d<i>.png (with d<i>_mask.png beside them when `masks`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample in enumerate(s for s in make_samples(2 * count, seed=seed) if s["mask"] is not None):
        if index == count:
            break
        Image.fromarray(sample["image"]).save(folder / f"d{index}.png")
        if masks:
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(folder / f"d{index}_mask.png")
        paths.append(folder / f"d{index}.png")
    return paths


def test_samples_from_a_shell_glob_pair_masks_and_never_add_a_mask_as_image(tmp_path):
    save_line(tmp_path / "bad", count=2)
    listed = sorted(str(p) for p in (tmp_path / "bad").glob("*.png"))  # what `--images bad/*.png` expands to
    assert len(listed) == 4
    samples, ignored = samples_from_files(listed, "anomaly")
    assert [(s["id"], s["mask"].rsplit("/", 1)[-1]) for s in samples] == [
        ("d0.png", "d0_mask.png"),
        ("d1.png", "d1_mask.png"),
    ]
    assert all(s["label"] == 1 for s in samples) and ignored == []
    folder_samples, _ = samples_from_files([str(tmp_path / "bad")], "anomaly")  # a folder gives the same pairs
    assert [(s["image"], s["mask"]) for s in folder_samples] == [(s["image"], s["mask"]) for s in samples]


def test_samples_from_files_explicit_masks_by_stem(tmp_path):
    images = save_line(tmp_path / "bad", count=2, masks=False)
    (tmp_path / "annot").mkdir()
    for image in images:
        Image.new("L", Image.open(image).size, 255).save(tmp_path / "annot" / image.name)
    samples, _ = samples_from_files([str(p) for p in reversed(images)], "anomaly", [str(tmp_path / "annot")])
    assert [(s["id"], s["mask"]) for s in samples] == [
        ("d1.png", str(tmp_path / "annot" / "d1.png")),
        ("d0.png", str(tmp_path / "annot" / "d0.png")),
    ]
    with pytest.raises(ValueError, match="Normal images have no defect masks"):
        samples_from_files([str(images[0])], "normal", [str(tmp_path / "annot")])


def test_unmasked_anomaly_is_an_image_level_entry_only(tiny_model, tmp_path):
    images = save_line(tmp_path / "bad", count=3, masks=False)
    samples, _ = samples_from_files([str(p) for p in images], "anomaly")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw UserWarning about "normal regions" reaches the user
        bank = entries_from_samples(tiny_model, samples, source="bad", progress=False)
    assert bank.image_values.argmax(1).tolist() == [1, 1, 1]
    assert bank.patch_keys.shape[0] == 0  # the reference would store each whole image as a *normal* region
    assert bank.metadata["image_level_only"] == 3


def test_add_mixes_masked_and_unmasked_anomalies(tiny_model, model_with_bank, tmp_path):
    base = model_with_bank.get_memory_bank()
    masked = save_line(tmp_path / "a", count=2, seed=3)
    unmasked = save_line(tmp_path / "b", count=1, seed=4, masks=False)
    samples, _ = samples_from_files([str(p) for p in masked + unmasked], "anomaly")
    grown = add_samples(base, model_with_bank, samples, source="line", dedup_threshold=None, progress=False)
    new_patch = grown.patch_sources[base.patch_keys.shape[0] :] - base.image_keys.shape[0]
    labels = grown.patch_values[base.patch_keys.shape[0] :].argmax(1)
    # every region prototype of the new entries comes from a masked image (entries 0 and 1), none from entry 2
    assert 2 not in new_patch.tolist() and set(new_patch.tolist()) == {0, 1}
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    assert grown.metadata["history"][-1]["image_level_only_anomalies"] == 1


def test_cli_bank_add_says_so(model_with_bank, tmp_path, capsys):
    model_with_bank.save_pretrained(tmp_path / "model")
    save_bank(model_with_bank.get_memory_bank(), tmp_path / "bank.safetensors")
    save_line(tmp_path / "bad", count=2, seed=5)
    save_line(tmp_path / "loose", count=1, seed=6, masks=False)
    images = sorted(str(p) for p in (tmp_path / "bad").glob("*.png")) + [str(tmp_path / "loose" / "d0.png")]
    args = [
        "bank",
        "add",
        str(tmp_path / "bank.safetensors"),
        "--model",
        str(tmp_path / "model"),
        "--images",
        *images,
        "--label",
        "anomaly",
        "--source",
        "line",
        "--output",
        str(tmp_path / "grown.safetensors"),
        "--no-dedup",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 anomalous image(s) had no mask: added as image-level anomalous entries only" in out
    grown = load_bank(tmp_path / "grown.safetensors")
    base = model_with_bank.get_memory_bank()
    assert grown.image_keys.shape[0] == base.image_keys.shape[0] + 3
    added_labels = grown.patch_values[base.patch_keys.shape[0] :].argmax(1).tolist()
    assert sorted(added_labels) == [0, 0, 1, 1]  # two masked images: one normal and one anomalous region each
    assert torch.equal(grown.image_values[-3:].argmax(1), torch.ones(3, dtype=torch.long))


def test_api_values_are_validated(tiny_model, model_with_bank):
    samples = make_samples(2, seed=8)
    for value in (0, -3, 1.5):
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
            entries_from_samples(tiny_model, samples, source="x", batch_size=value, progress=False)
    with pytest.raises(ValueError, match="cosine similarity in \\(0, 1\\]"):
        add_samples(
            model_with_bank.get_memory_bank(),
            model_with_bank,
            samples,
            source="x",
            dedup_threshold=float("nan"),
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown label"):
        samples_from_files([], "maybe")


def test_cli_prints_the_ignored_summary_as_one_line(model_with_bank, tmp_path, capsys):
    from mrad_hf.cli.main import main as cli_main

    model_with_bank.save_pretrained(tmp_path / "model")
    save_bank(model_with_bank.get_memory_bank(), tmp_path / "bank.safetensors")
    save_line(tmp_path / "line" / "dent", count=1, seed=9)
    (tmp_path / "line" / "good").mkdir()
    Image.fromarray(make_samples(1, seed=9)[0]["image"]).save(tmp_path / "line" / "good" / "g.png")
    (tmp_path / "line" / "good" / "notes.txt").write_text("x")
    args = [
        "bank",
        "add",
        str(tmp_path / "bank.safetensors"),
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        "folder",
        "--data-root",
        str(tmp_path / "line"),
        "--source",
        "line",
        "--output",
        str(tmp_path / "g.safetensors"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a Python warning: a line of the command's output
        assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "Ignored 1 file(s) under" in captured.out and "1 unsupported extension" in captured.out
