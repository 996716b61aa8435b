# SPDX-License-Identifier: Apache-2.0
"""Corrupt files: one `on_error` ("skip" | "fail") wherever a dataset is read, never a raw PIL OSError, and
`calibrate` never counts an unreadable file as a good image (issue 12 §2)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf.cli.main import main
from mrad_hf.data.loaders import iter_readable_rows, load_folder, readable_items, readable_subset, undecoded_images
from mrad_hf.memory import build_memory_bank, save_bank
from mrad_hf.memory.tools import entries_from_samples, image_ids
from mrad_hf.models.mrad.image_processing_mrad import MRADImageProcessor, MRADInputError


@pytest.fixture
def folder_with_truncated_file(tmp_path):
    root = tmp_path / "part"
    for sample in make_samples(6, seed=2):
        folder = root / ("good" if sample["mask"] is None else "dent")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{sample['id']}.png")
        if sample["mask"] is not None:
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(folder / f"{sample['id']}_mask.png")
    good = root / "good" / "img0.png"
    good.write_bytes(good.read_bytes()[:200])  # a truncated PNG: PIL opens it and fails on load
    return root


def test_readable_subset_skips_or_fails_naming_the_file(folder_with_truncated_file):
    dataset = load_folder(folder_with_truncated_file)
    processor = MRADImageProcessor(image_size=56)
    failures = []
    readable = readable_subset(dataset, processor.load_pair, failures=failures)
    assert len(readable) == len(dataset) - 1 and "good/img0.png" not in list(readable["id"])
    assert [f["path"].rsplit("/", 2)[-2:] for f in failures] == [
        ["good", "img0.png"]
    ] and "truncated or corrupt" in failures[0]["error"]
    with pytest.raises(MRADInputError, match="img0.png"):
        readable_subset(dataset, processor.load_pair, on_error="fail")
    rows = list(iter_readable_rows(dataset, processor.load_pair, failures=(seen := [])))
    assert len(rows) == len(readable) and len(seen) == 1
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'fail'"):
        readable_subset(dataset, processor.load_pair, on_error="ignore")


def test_datasets_decoding_would_raise_a_raw_oserror_mrad_decoding_names_the_file(folder_with_truncated_file):
    dataset = load_folder(folder_with_truncated_file)
    index = list(dataset["id"]).index("good/img0.png")
    with pytest.raises(OSError):  # what training and build_memory_bank hit before: PIL inside datasets
        dataset[index]["image"]
    raw = undecoded_images(dataset)[index]["image"]
    with pytest.raises(MRADInputError, match="img0.png.*truncated or corrupt"):
        MRADImageProcessor(image_size=56).load(raw)


def test_bank_entries_from_a_dataset_with_a_corrupt_file_name_it(folder_with_truncated_file):
    dataset = load_folder(folder_with_truncated_file)
    with pytest.raises(MRADInputError, match="img0.png"):
        entries_from_samples(make_tiny_model(), dataset, source="line", progress=False)


def test_train_names_the_corrupt_file_or_skips_it(folder_with_truncated_file, tmp_path, capsys, reset_accelerate):
    from mrad_hf.training.trainer import MRADTrainingArguments, train_mrad

    dataset = load_folder(folder_with_truncated_file)
    args = MRADTrainingArguments(
        output_dir=str(tmp_path / "api"), ft_epochs=1, batch_size=2, max_steps_per_epoch=1, resume=False
    )
    model = make_tiny_model(variant="ft")
    with pytest.raises(MRADInputError, match="img0.png"):
        train_mrad(model, dataset, args, progress=False)
    command = [
        "train",
        "--variant",
        "ft",
        "--clip",
        "random-tiny",
        "--aux-dataset",
        "folder",
        "--aux-root",
        str(folder_with_truncated_file),
        "--output-dir",
        str(tmp_path / "cli"),
        "--image-size",
        "112",
        "--batch-size",
        "2",
        "--max-steps-per-epoch",
        "1",
        "--no-resume",
    ]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "SKIPPED 1 file(s) that could not be read, e.g." in out and "img0.png" in out
    assert "Training MRAD-FT on 5 folder images" in out


def test_calibrate_never_counts_an_unreadable_file_as_good(tmp_path):
    from mrad_hf.tools.calibration import calibrate

    model = make_tiny_model(image_size=56, retrieval_temperature=0.01)
    build_memory_bank(model, make_samples(6, seed=1, height=56, width=56), source="aux", progress=False)
    paths = []
    for index, sample in enumerate(make_samples(10, seed=4, height=56, width=56)):
        paths.append(tmp_path / f"ok{index}.png")
        Image.fromarray(sample["image"]).save(paths[-1])
    paths[3].write_bytes(b"")  # empty
    paths[7].write_bytes(paths[7].read_bytes()[:100])  # truncated
    with pytest.raises(Exception, match="at least 9 known-good images"):  # 8 readable of 10: below the minimum for 0.1
        calibrate(model, [str(p) for p in paths], target_fpr=0.1, progress=False)
    calibration = calibrate(model, [str(p) for p in paths], target_fpr=0.2, progress=False)
    assert calibration["n_normal_images"] == 8
    assert sorted(f["path"].rsplit("/", 1)[-1] for f in calibration["skipped_files"]) == ["ok3.png", "ok7.png"]
    with pytest.raises(MRADInputError, match="ok3.png"):
        calibrate(model, [str(p) for p in paths], target_fpr=0.2, progress=False, on_error="fail")
    assert readable_items([str(paths[0]), str(paths[3])], MRADImageProcessor(image_size=56).load) == [str(paths[0])]


def test_bank_entries_skip_corrupt_rows_and_keep_flags_aligned(folder_with_truncated_file):
    from mrad_hf.data.loaders import file_sha256

    root = folder_with_truncated_file
    (root / "dent" / "img5_mask.png").unlink()  # img5: anomalous without a mask, after the skipped row
    dataset = load_folder(root)
    failures = []
    bank = entries_from_samples(
        make_tiny_model(), dataset, source="line", progress=False, on_error="skip", failures=failures
    )
    assert len(failures) == 1 and failures[0]["path"].endswith("img0.png")
    ids = image_ids(bank)
    assert len(ids) == len(dataset) - 1 and "good/img0.png" not in ids
    unmasked = ids.index("dent/img5.png")
    assert unmasked not in bank.patch_sources.tolist()  # no region prototype from the unmasked anomaly
    assert set(bank.patch_sources.tolist()) == set(range(len(ids))) - {unmasked}
    assert bank.metadata["image_level_only"] == 1
    rows = list(iter_readable_rows(dataset, MRADImageProcessor(image_size=56).load_pair))
    assert [row["sha256"] for row in rows] == [file_sha256(row["path"]) for row in rows] and all(rows[0]["sha256"])


def test_cli_bank_add_from_a_dataset_skips_the_corrupt_file(
    folder_with_truncated_file, model_with_bank, tmp_path, capsys
):
    model_with_bank.save_pretrained(tmp_path / "model")
    save_bank(model_with_bank.get_memory_bank(), tmp_path / "bank.safetensors")
    args = [
        "bank",
        "add",
        str(tmp_path / "bank.safetensors"),
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        "folder",
        "--data-root",
        str(folder_with_truncated_file),
        "--source",
        "line",
        "--output",
        str(tmp_path / "g.safetensors"),
        "--no-dedup",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "SKIPPED 1 file(s) that could not be read" in out and "img0.png" in out
    assert "image entries 6 -> 11" in out
