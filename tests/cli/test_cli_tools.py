# SPDX-License-Identifier: Apache-2.0
"""`mrad bank add|info|merge|remove`, `mrad calibrate`, `mrad explain` end to end on files, plus decisions in `mrad predict`."""

import json

import numpy as np
import pytest
import torch
from conftest import make_samples
from PIL import Image

from mrad_hf import MRADForAnomalyDetection
from mrad_hf.cli.main import main
from mrad_hf.memory import load_bank, save_bank
from mrad_hf.memory.tools import image_ids, image_sources


@pytest.fixture
def workspace(model_with_bank, tmp_path):
    model_with_bank.save_pretrained(tmp_path / "model")
    save_bank(model_with_bank.get_memory_bank(), tmp_path / "bank.safetensors")
    line = tmp_path / "line"
    (line / "good").mkdir(parents=True)
    (line / "dent").mkdir()
    for index, sample in enumerate(make_samples(4, seed=51)):
        if sample["mask"] is None:
            Image.fromarray(sample["image"]).save(line / "good" / f"g{index}.png")
        else:
            Image.fromarray(sample["image"]).save(line / "dent" / f"d{index}.png")
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(line / "dent" / f"d{index}_mask.png")
    good = tmp_path / "good"
    good.mkdir()
    for index, sample in enumerate(make_samples(9, seed=52)):
        Image.fromarray(sample["image"]).save(good / f"ok{index}.png")
    return tmp_path


def test_bank_add_info_merge_remove(workspace, capsys):
    base = load_bank(workspace / "bank.safetensors")
    args = [
        "bank",
        "add",
        str(workspace / "bank.safetensors"),
        "--model",
        str(workspace / "model"),
        "--dataset",
        "folder",
        "--data-root",
        str(workspace / "line"),
        "--source",
        "line",
        "--output",
        str(workspace / "grown.safetensors"),
        "--no-dedup",
    ]
    assert main(args) == 0
    grown = load_bank(workspace / "grown.safetensors")
    assert (
        grown.counts()["image_entries"] == 10 and grown.counts()["patch_entries"] == base.counts()["patch_entries"] + 6
    )
    assert image_sources(grown)[6:] == ["line"] * 4
    assert image_ids(grown)[6] == "dent/d1.png"  # loader order: defect folders, then good; ids relative to the root
    capsys.readouterr()
    assert main(["bank", "info", str(workspace / "grown.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["per_source"]["line"] == {
        "anomalous images": 2,
        "normal images": 2,
        "anomalous regions": 2,
        "normal regions": 4,
    }
    assert (
        main(
            [
                "bank",
                "merge",
                str(workspace / "bank.safetensors"),
                str(workspace / "grown.safetensors"),
                "--output",
                str(workspace / "merged.safetensors"),
            ]
        )
        == 0
    )
    merged = load_bank(workspace / "merged.safetensors")
    assert merged.counts() == grown.counts()  # the grown bank's copy of the base entries is deduplicated away
    assert image_sources(merged) == image_sources(grown)
    assert (
        main(
            [
                "bank",
                "remove",
                str(workspace / "grown.safetensors"),
                "--source",
                "line",
                "--output",
                str(workspace / "back.safetensors"),
            ]
        )
        == 0
    )
    back = load_bank(workspace / "back.safetensors")
    assert torch.equal(back.patch_keys, base.patch_keys) and torch.equal(back.image_keys, base.image_keys)


def test_bank_add_images_with_one_label_and_bad_input(workspace, capsys):
    bank = str(workspace / "bank.safetensors")
    dents = sorted(str(p) for p in (workspace / "line" / "dent").glob("d?.png"))
    assert (
        main(
            [
                "bank",
                "add",
                bank,
                "--model",
                str(workspace / "model"),
                "--images",
                *dents,
                "--label",
                "anomaly",
                "--source",
                "bad",
            ]
        )
        == 0
    )
    grown = load_bank(bank)  # replaced in place
    assert grown.image_values[-2:].argmax(1).tolist() == [1, 1] and image_ids(grown)[-2:] == ["d1.png", "d3.png"]
    capsys.readouterr()
    assert (
        main(
            [
                "bank",
                "add",
                bank,
                "--model",
                str(workspace / "model"),
                "--images",
                *dents,
                "--masks",
                dents[0],
                "--label",
                "anomaly",
                "--source",
                "x",
            ]
        )
        == 2
    )
    assert "no mask among the given masks for" in capsys.readouterr().err
    assert main(["bank", "remove", bank, "--source", "nope"]) == 2
    assert "its sources are ['bad', 'unit-test']" in capsys.readouterr().err


def test_calibrate_then_explain_and_predict_decide(workspace, capsys):
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(workspace / "model"),
                "--images",
                str(workspace / "good"),
                "--target-fpr",
                "0.1",
                "--output",
                str(workspace / "cal.json"),
                "--save-model",
                str(workspace / "calibrated"),
            ]
        )
        == 0
    )
    calibration = json.loads((workspace / "cal.json").read_text())
    assert calibration["n_normal_images"] == 9 and calibration["target_fpr"] == 0.1
    written = f"Calibration written to {workspace / 'cal.json'}, {workspace / 'calibrated' / 'calibration.json'}"
    assert written in capsys.readouterr().out
    assert MRADForAnomalyDetection.from_pretrained(workspace / "calibrated").calibration == calibration
    out = workspace / "explain"
    dents = sorted(str(p) for p in (workspace / "line" / "dent").glob("d?.png"))
    assert (
        main(["explain", "--model", str(workspace / "calibrated"), *dents, "--output-dir", str(out), "--top-k", "2"])
        == 0
    )
    records = json.loads((out / "explanations.json").read_text())
    assert len(records) == 2 and all(Image.open(r["panel"]).size[0] > 0 for r in records)
    printed = capsys.readouterr().out
    for record in records:  # the console line shows the decision, as explanations.json records it
        decision = "anomaly" if record["is_anomalous"] else "normal "
        assert f"{record['score']:.6f}  {decision}  {record['path']}  nearest:" in printed
    for record in records:
        assert record["is_anomalous"] == (record["score"] > calibration["image_threshold"])
        assert [n["rank"] for n in record["explanation"]["image"]["neighbours"]] == [1, 2]
    assert (
        main(
            [
                "predict",
                "--model",
                str(workspace / "calibrated"),
                str(workspace / "good"),
                "--output-dir",
                str(workspace / "pred"),
            ]
        )
        == 0
    )
    scored = json.loads((workspace / "pred" / "scores.json").read_text())["results"]
    assert all(r["is_anomalous"] == (r["score"] > calibration["image_threshold"]) for r in scored)
    printed = capsys.readouterr().out
    for record in scored:
        assert f"{record['score']:.6f}  {record['label']:7s}  {record['path']}" in printed
    assert all(r["thresholds"]["from"] == "calibration" for r in scored)
    capsys.readouterr()
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(workspace / "model"),
                "--images",
                str(workspace / "good"),
                "--target-fpr",
                "0.05",
            ]
        )
        == 2
    )
    assert "needs at least 19 known-good images" in capsys.readouterr().err


def test_calibrate_writes_only_where_asked(workspace, capsys, monkeypatch):
    """No calibration.json in the current folder by default: only --output, --save-model or --bank-output keep it,
    and the last line says where it went (or that it went nowhere)."""
    monkeypatch.chdir(workspace / "line")
    args = [
        "calibrate",
        "--model",
        str(workspace / "model"),
        "--images",
        str(workspace / "good"),
        "--target-fpr",
        "0.1",
    ]
    assert main(args) == 0
    assert "The calibration was not saved (nothing asked for it): pass --save-model DIR" in capsys.readouterr().out
    assert not (workspace / "line" / "calibration.json").exists()
    assert main([*args, "--save-model", str(workspace / "calibrated")]) == 0
    assert f"Calibration written to {workspace / 'calibrated' / 'calibration.json'}\n" in capsys.readouterr().out
    assert not (workspace / "line" / "calibration.json").exists()
    assert json.loads((workspace / "calibrated" / "calibration.json").read_text())["n_normal_images"] == 9


def test_bank_add_says_what_de_duplication_dropped(workspace, capsys):
    """The same good image given twice: its second copy (1 image + 1 region entry) is dropped, and the summary says
    so and how to keep it; --no-dedup keeps both copies."""
    bank = workspace / "bank.safetensors"
    before = load_bank(bank).counts()
    image = str(workspace / "good" / "ok0.png")
    twin = workspace / "twin.png"
    twin.write_bytes((workspace / "good" / "ok0.png").read_bytes())
    add = ["bank", "add", str(bank), "--model", str(workspace / "model"), "--images", image, str(twin)]
    assert main([*add, "--label", "normal", "--source", "ok", "--output", str(workspace / "a.safetensors")]) == 0
    images, regions = before["image_entries"], before["patch_entries"]

    def counts(added: int) -> str:
        return f"image entries {images} -> {images + added}, region entries {regions} -> {regions + added}"

    assert f"{counts(1)} (2 near-duplicate entries dropped; --no-dedup keeps them)" in capsys.readouterr().out
    keep = [*add, "--label", "normal", "--source", "ok", "--no-dedup", "--output", str(workspace / "b.safetensors")]
    assert main(keep) == 0
    printed = capsys.readouterr().out
    assert f"{counts(2)}\n" in printed
    assert "near-duplicate" not in printed


def test_bank_add_with_a_new_clip_model_takes_the_bank_s_image_size_and_shows_a_total(workspace, capsys):
    """`bank add --clip` builds the model at the bank's feature settings (its image size passed once, not twice), and
    the progress bar over a loader dataset has its total."""
    bank = workspace / "random.safetensors"
    build = ["build-bank", "--clip", "random-tiny", "--image-size", "112", "--dataset", "folder"]
    assert main([*build, "--data-root", str(workspace / "line"), "--output", str(bank)]) == 0
    capsys.readouterr()
    add = ["bank", "add", str(bank), "--clip", "random-tiny", "--dataset", "folder", "--data-root"]
    assert (
        main([*add, str(workspace / "line"), "--source", "again", "--output", str(workspace / "r2.safetensors")]) == 0
    )
    captured = capsys.readouterr()
    assert "Building memory bank: 100%" in captured.err and "4/4" in captured.err
    dropped = "image entries 4 -> 4, region entries 6 -> 6 (10 near-duplicate entries dropped; --no-dedup keeps them)"
    assert dropped in captured.out  # the same 4 images again: all 4 image and 6 region entries are duplicates
