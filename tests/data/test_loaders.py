# SPDX-License-Identifier: Apache-2.0
"""Tests for ``mrad_hf.data.loaders`` on tiny synthetic folders laid out like the official archives."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from mrad_hf.data import loaders
from mrad_hf.data.loaders import (
    DATASET_LOADERS,
    LOADER_FEATURES,
    DatasetLayoutError,
    binarize_mask,
    load_benchmark,
    load_br35h,
    load_brainmri,
    load_btad,
    load_clinicdb,
    load_colondb,
    load_dagm,
    load_dtd_synthetic,
    load_endo,
    load_folder,
    load_headct,
    load_isic,
    load_ksdd2,
    load_kvasir,
    load_mpdd,
    load_mvtec,
    load_visa,
    with_binary_masks,
)

# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def write_image(path: Path, value: int = 128, mode: str = "RGB", size: tuple[int, int] = (6, 4)) -> Path:
    """Writes a tiny constant image; the format follows the extension (bmp/jpg/png/tif, any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (value,) * 3 if mode == "RGB" else value
    Image.new(mode, size, fill).save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def write_mask(path: Path, value: int = 255, size: tuple[int, int] = (6, 4)) -> Path:
    """Writes a mask whose left half is ``value`` and right half 0 (``value=0`` gives an empty mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, : size[0] // 2] = value
    Image.fromarray(array).save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def make_mvtec_style(
    root: Path,
    category: str,
    defects: dict[str, Iterable[str]],
    *,
    normal: str = "good",
    normal_ids: Iterable[str] = ("000",),
    train_ids: Iterable[str] = ("000", "001"),
    image_ext: str = ".png",
    mask_name: str = "{stem}_mask.png",
) -> None:
    """``<category>/{train/<normal>, test/<normal>, test/<defect>, ground_truth/<defect>}``."""
    base = root / category
    for stem in train_ids:
        write_image(base / "train" / normal / f"{stem}{image_ext}")
    for stem in normal_ids:
        write_image(base / "test" / normal / f"{stem}{image_ext}")
    for defect, stems in defects.items():
        for stem in stems:
            write_image(base / "test" / defect / f"{stem}{image_ext}")
            write_mask(base / "ground_truth" / defect / mask_name.format(stem=stem))


def column(dataset: Dataset, name: str) -> list:
    return dataset.select_columns([name])[name]


def assert_well_formed(dataset: Dataset, *, with_masks: bool = True) -> None:
    """Schema, sort order, absolute existing paths, mask present exactly for anomalous rows."""
    assert dataset.features == LOADER_FEATURES
    assert dataset.cache_files == []  # built in memory: nothing written to the HF cache
    rows = dataset.select_columns(["label", "category", "defect_type", "path", "mask_path"]).to_list()
    keys = [(row["category"], row["defect_type"], row["path"]) for row in rows]
    assert keys == sorted(keys)
    for row in rows:
        assert os.path.isabs(row["path"]) and os.path.isfile(row["path"])
        assert (row["defect_type"] == "good") == (row["label"] == 0)
        has_mask = row["mask_path"] is not None
        assert has_mask == (with_masks and row["label"] == 1)
        if has_mask:
            assert os.path.isabs(row["mask_path"]) and os.path.isfile(row["mask_path"])


def summary(dataset: Dataset) -> list[tuple[str, str, int, str, str | None]]:
    """``(category, defect_type, label, image name, mask name)`` per row."""
    rows = dataset.select_columns(["category", "defect_type", "label", "path", "mask_path"]).to_list()
    return [
        (
            row["category"],
            row["defect_type"],
            row["label"],
            Path(row["path"]).name,
            None if row["mask_path"] is None else Path(row["mask_path"]).name,
        )
        for row in rows
    ]


def assert_layout_error(call: Callable[[], object], missing: Path) -> DatasetLayoutError:
    with pytest.raises(DatasetLayoutError) as info:
        call()
    message = str(info.value)
    assert str(missing) in message
    assert "Expected layout:" in message and "What to do:" in message
    return info.value


# --------------------------------------------------------------------------------------------------
# MVTec AD and the other MVTec-style sets
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    make_mvtec_style(tmp_path, "bottle", {"broken_large": ["000", "001"], "contamination": ["000"]})
    make_mvtec_style(tmp_path, "cable", {"cut_inner_insulation": ["000"]}, normal_ids=("000", "001"))
    return tmp_path


def test_mvtec_test_split(mvtec_root: Path) -> None:
    dataset = load_mvtec(mvtec_root, categories=["cable", "bottle"])
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("bottle", "broken_large", 1, "000.png", "000_mask.png"),
        ("bottle", "broken_large", 1, "001.png", "001_mask.png"),
        ("bottle", "contamination", 1, "000.png", "000_mask.png"),
        ("bottle", "good", 0, "000.png", None),
        ("cable", "cut_inner_insulation", 1, "000.png", "000_mask.png"),
        ("cable", "good", 0, "000.png", None),
        ("cable", "good", 0, "001.png", None),
    ]
    first = dataset[0]
    assert first["path"] == str(mvtec_root / "bottle" / "test" / "broken_large" / "000.png")
    assert first["mask_path"] == str(mvtec_root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    assert first["image"].size == (6, 4) and first["mask"].mode == "L"
    assert dataset[3]["mask"] is None
    assert dataset.features["label"].names == ["normal", "anomaly"]


def test_mvtec_train_split_is_good_only(mvtec_root: Path) -> None:
    dataset = load_mvtec(mvtec_root, categories="bottle", split="train")
    assert summary(dataset) == [("bottle", "good", 0, "000.png", None), ("bottle", "good", 0, "001.png", None)]


def test_mvtec_all_categories_required_by_default(mvtec_root: Path) -> None:
    assert_layout_error(lambda: load_mvtec(mvtec_root), mvtec_root / "capsule")


def test_mvtec_missing_ground_truth_folder(mvtec_root: Path) -> None:
    gt = mvtec_root / "bottle" / "ground_truth" / "contamination"
    for mask in gt.iterdir():
        mask.unlink()
    gt.rmdir()
    error = assert_layout_error(lambda: load_mvtec(mvtec_root, ["bottle"]), gt)
    assert error.missing == gt


def test_mvtec_image_without_mask_is_an_error(mvtec_root: Path) -> None:
    (mvtec_root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    image = mvtec_root / "bottle" / "test" / "broken_large" / "001.png"
    assert_layout_error(lambda: load_mvtec(mvtec_root, ["bottle"]), image)


def test_unmatched_mask_names_fall_back_to_sorted_order_with_warning(tmp_path: Path) -> None:
    make_mvtec_style(tmp_path, "bottle", {"crack": ["a", "b"]}, mask_name="m_{stem}.png")
    with pytest.warns(UserWarning, match="sorted order"):
        dataset = load_mvtec(tmp_path, ["bottle"])
    assert [row[3:] for row in summary(dataset)[:2]] == [("a.png", "m_a.png"), ("b.png", "m_b.png")]


def test_unknown_category_lists_available(mvtec_root: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown category 'bottel'.*bottle, cable, capsule"):
        load_mvtec(mvtec_root, ["bottel"])


def test_unknown_split(mvtec_root: Path) -> None:
    with pytest.raises(ValueError, match="available splits: train, test"):
        load_mvtec(mvtec_root, ["bottle"], split="val")


@pytest.mark.parametrize(
    ("loader", "category"),
    [(load_mpdd, "bracket_black"), (load_dtd_synthetic, "Woven_001"), (load_ksdd2, "electrical commutators")],
)
def test_mvtec_style_sets(tmp_path: Path, loader: Callable[..., Dataset], category: str) -> None:
    make_mvtec_style(tmp_path, category, {"defect_a": ["000", "001"]})
    dataset = loader(tmp_path, [category])
    assert_well_formed(dataset)
    assert summary(dataset) == [
        (category, "defect_a", 1, "000.png", "000_mask.png"),
        (category, "defect_a", 1, "001.png", "001_mask.png"),
        (category, "good", 0, "000.png", None),
    ]
    assert len(loader(tmp_path, [category], split="train")) == 2


# --------------------------------------------------------------------------------------------------
# BTAD
# --------------------------------------------------------------------------------------------------


def test_btad_ok_ko_and_per_category_extensions(tmp_path: Path) -> None:
    make_mvtec_style(tmp_path, "01", {"ko": ["0000", "0001"]}, normal="ok", image_ext=".bmp", mask_name="{stem}.png")
    make_mvtec_style(tmp_path, "02", {"ko": ["0000"]}, normal="ok", image_ext=".png", mask_name="{stem}.png")
    make_mvtec_style(tmp_path, "03", {"ko": ["0000"]}, normal="ok", image_ext=".bmp", mask_name="{stem}.bmp")
    dataset = load_btad(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("01", "good", 0, "000.bmp", None),
        ("01", "ko", 1, "0000.bmp", "0000.png"),
        ("01", "ko", 1, "0001.bmp", "0001.png"),
        ("02", "good", 0, "000.png", None),
        ("02", "ko", 1, "0000.png", "0000.png"),
        ("03", "good", 0, "000.bmp", None),
        ("03", "ko", 1, "0000.bmp", "0000.bmp"),
    ]
    assert set(column(load_btad(tmp_path, split="train"), "defect_type")) == {"good"}


def test_btad_missing_category(tmp_path: Path) -> None:
    make_mvtec_style(tmp_path, "01", {"ko": ["0000"]}, normal="ok", mask_name="{stem}.png")
    assert_layout_error(lambda: load_btad(tmp_path), tmp_path / "02")


# --------------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------------

VISA_HEADER = "object,split,label,image,mask\n"


def make_visa(root: Path) -> None:
    lines = [VISA_HEADER]
    for obj in ("candle", "pcb1"):
        for split, label, stem in [
            ("train", "normal", "0000"),
            ("test", "normal", "0001"),
            ("test", "anomaly", "000"),
        ]:
            folder = "Normal" if label == "normal" else "Anomaly"
            image = f"{obj}/Data/Images/{folder}/{stem}.JPG"
            write_image(root / image)
            mask = ""
            if label == "anomaly":
                mask = f"{obj}/Data/Masks/Anomaly/{stem}.png"
                write_mask(root / mask, value=1)  # VisA quirk: defect ids, not 255
            lines.append(f"{obj},{split},{label},{image},{mask}\n")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("".join(lines))


def test_visa_from_split_csv(tmp_path: Path) -> None:
    make_visa(tmp_path)
    dataset = load_visa(tmp_path, ["pcb1", "candle"])
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("candle", "defect", 1, "000.JPG", "000.png"),
        ("candle", "good", 0, "0001.JPG", None),
        ("pcb1", "defect", 1, "000.JPG", "000.png"),
        ("pcb1", "good", 0, "0001.JPG", None),
    ]
    assert dataset[0]["path"] == str(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
    assert summary(load_visa(tmp_path, ["candle"], split="train")) == [("candle", "good", 0, "0000.JPG", None)]


def test_visa_masks_are_raw_and_binarised_on_request(tmp_path: Path) -> None:
    make_visa(tmp_path)
    dataset = load_visa(tmp_path, ["candle"])
    assert set(np.unique(np.array(dataset[0]["mask"]))) == {0, 1}
    binary = with_binary_masks(dataset)
    assert set(np.unique(np.array(binary[0]["mask"]))) == {0, 255}
    assert binary[1]["mask"] is None
    assert set(np.unique(np.array(binarize_mask(dataset[0]["mask"])))) == {0, 255}


def test_visa_missing_csv(tmp_path: Path) -> None:
    make_visa(tmp_path)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.unlink()
    error = assert_layout_error(lambda: load_visa(tmp_path), csv_path)
    assert "split_csv/" in str(error)


def test_visa_missing_image_named(tmp_path: Path) -> None:
    make_visa(tmp_path)
    image = tmp_path / "pcb1" / "Data" / "Images" / "Anomaly" / "000.JPG"
    image.unlink()
    assert_layout_error(lambda: load_visa(tmp_path, ["pcb1"]), image)


@pytest.mark.parametrize(
    "column, entry, why",
    [
        ("image", "../outside/secret.JPG", "'..' part"),
        ("image", "{outside}/secret.JPG", "absolute path"),
        ("mask", "{outside}/secret_mask.png", "absolute path"),
        ("image", "candle/link/secret.JPG", "symlink"),  # a symlinked folder inside the root that leads out of it
        ("image", "candle/" + "x" * 300 + ".JPG", "too long"),
    ],
)
def test_visa_csv_paths_must_stay_inside_the_root(tmp_path: Path, column: str, entry: str, why: str) -> None:
    """A csv row naming a file outside --data-root is refused, naming the csv, the line and the path; nothing is read."""
    root, outside = tmp_path / "visa", tmp_path / "outside"
    make_visa(root)
    write_image(outside / "secret.JPG"), write_mask(outside / "secret_mask.png", value=1)
    (root / "candle" / "link").symlink_to(outside, target_is_directory=True)
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    number, line = next((n, text) for n, text in enumerate(lines, 1) if text.startswith("candle,test,anomaly"))
    fields = line.rstrip("\n").split(",")
    fields[3 if column == "image" else 4] = entry.format(outside=outside)
    lines[number - 1] = ",".join(fields) + "\n"
    csv_path.write_text("".join(lines))
    error = assert_layout_error(lambda: load_visa(root, ["candle"]), csv_path)
    assert f"{csv_path} line {number}: the {column} path {entry.format(outside=outside)!r}" in str(error)
    assert why in str(error) and error.missing == csv_path


def test_visa_csv_paths_inside_the_root_may_go_through_symlinks(tmp_path: Path) -> None:
    """The root itself a symlink, or a symlinked folder that stays inside it: read as before, ids unchanged."""
    make_visa(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    images = tmp_path / "real" / "candle" / "Data" / "Images"
    (images / "Mirror").symlink_to(images / "Normal", target_is_directory=True)
    csv_path = tmp_path / "real" / "split_csv" / "1cls.csv"
    csv_path.write_text(
        csv_path.read_text().replace("candle/Data/Images/Normal/0001", "candle/Data/Images/Mirror/0001")
    )
    dataset = load_visa(tmp_path / "link", ["candle"])
    assert sorted(dataset["id"]) == ["candle/Data/Images/Anomaly/000.JPG", "candle/Data/Images/Mirror/0001.JPG"]


def test_visa_csv_without_requested_category(tmp_path: Path) -> None:
    make_visa(tmp_path)
    assert_layout_error(lambda: load_visa(tmp_path), tmp_path / "split_csv" / "1cls.csv")


def test_visa_csv_missing_column(tmp_path: Path) -> None:
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,label,image\n")
    with pytest.raises(DatasetLayoutError, match="lacks the column"):
        load_visa(tmp_path, ["candle"])


def test_visa_anomalib_pytorch_layout(tmp_path: Path) -> None:
    make_mvtec_style(tmp_path, "candle", {"bad": ["000"]}, mask_name="{stem}.png")
    assert summary(load_visa(tmp_path, ["candle"])) == [
        ("candle", "bad", 1, "000.png", "000.png"),
        ("candle", "good", 0, "000.png", None),
    ]


def test_visa_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="candle, capsules"):
        load_visa(tmp_path, ["candel"])


# --------------------------------------------------------------------------------------------------
# KSDD2 (raw archive) and DAGM
# --------------------------------------------------------------------------------------------------


def test_ksdd2_raw_archive_labels_from_gt(tmp_path: Path) -> None:
    for split in ("train", "test"):
        write_image(tmp_path / split / "10000.png")
        write_mask(tmp_path / split / "10000_GT.png", value=0)
        write_image(tmp_path / split / "10001.png")
        write_mask(tmp_path / split / "10001_GT.png", value=255)
    dataset = load_ksdd2(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("electrical commutators", "defect", 1, "10001.png", "10001_GT.png"),
        ("electrical commutators", "good", 0, "10000.png", None),
    ]


def test_ksdd2_missing_everything(tmp_path: Path) -> None:
    assert_layout_error(lambda: load_ksdd2(tmp_path), tmp_path / "electrical commutators")


def make_dagm(root: Path, category: str) -> None:
    for split in ("Train", "Test"):
        folder = root / category / split
        for stem in ("0001", "0002", "0003"):
            write_image(folder / f"{stem}.PNG", mode="L")
        write_mask(folder / "Label" / "0002_label.PNG")
        (folder / "Label" / "Labels.txt").write_text("1\n")


def test_dagm(tmp_path: Path) -> None:
    make_dagm(tmp_path, "Class1")
    make_dagm(tmp_path, "Class10")
    dataset = load_dagm(tmp_path, ["Class10", "Class1"])
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("Class1", "defect", 1, "0002.PNG", "0002_label.PNG"),
        ("Class1", "good", 0, "0001.PNG", None),
        ("Class1", "good", 0, "0003.PNG", None),
        ("Class10", "defect", 1, "0002.PNG", "0002_label.PNG"),
        ("Class10", "good", 0, "0001.PNG", None),
        ("Class10", "good", 0, "0003.PNG", None),
    ]
    assert str(tmp_path / "Class1" / "Train" / "0001.PNG") in column(
        load_dagm(tmp_path, ["Class1"], split="train"), "path"
    )


def test_dagm_missing_label_folder(tmp_path: Path) -> None:
    make_dagm(tmp_path, "Class1")
    label = tmp_path / "Class1" / "Test" / "Label"
    for file in label.iterdir():
        file.unlink()
    label.rmdir()
    assert_layout_error(lambda: load_dagm(tmp_path, ["Class1"]), label)


# --------------------------------------------------------------------------------------------------
# Medical sets
# --------------------------------------------------------------------------------------------------


def test_headct_image_labels_only(tmp_path: Path) -> None:
    for name in ("000.png", "001.png"):
        write_image(tmp_path / "brain" / "test" / "good" / name, mode="L")
    write_image(tmp_path / "brain" / "test" / "Ungood" / "100.png", mode="L")
    dataset = load_headct(tmp_path)
    assert_well_formed(dataset, with_masks=False)
    assert summary(dataset) == [
        ("brain", "Ungood", 1, "100.png", None),
        ("brain", "good", 0, "000.png", None),
        ("brain", "good", 0, "001.png", None),
    ]
    with pytest.raises(ValueError, match="available splits: test"):
        load_headct(tmp_path, split="train")


def make_no_yes(folder: Path) -> None:
    write_image(folder / "no" / "1 no.jpeg")
    write_image(folder / "no" / "N2.JPG")
    write_image(folder / "yes" / "Y1.jpg")


@pytest.mark.parametrize("nested", [True, False], ids=["brain_tumor_dataset", "flat"])
def test_brainmri(tmp_path: Path, nested: bool) -> None:
    make_no_yes(tmp_path / "brain_tumor_dataset" if nested else tmp_path)
    dataset = load_brainmri(tmp_path)
    assert_well_formed(dataset, with_masks=False)
    assert summary(dataset) == [
        ("brain", "good", 0, "1 no.jpeg", None),
        ("brain", "good", 0, "N2.JPG", None),
        ("brain", "tumor", 1, "Y1.jpg", None),
    ]


def test_br35h_ignores_pred(tmp_path: Path) -> None:
    make_no_yes(tmp_path)
    write_image(tmp_path / "pred" / "pred0.jpg")
    dataset = load_br35h(tmp_path)
    assert_well_formed(dataset, with_masks=False)
    assert [row[1:4] for row in summary(dataset)] == [
        ("good", 0, "1 no.jpeg"),
        ("good", 0, "N2.JPG"),
        ("tumor", 1, "Y1.jpg"),
    ]


def test_br35h_missing_yes(tmp_path: Path) -> None:
    write_image(tmp_path / "no" / "a.jpg")
    assert_layout_error(lambda: load_br35h(tmp_path), tmp_path / "yes")


def test_isic_mrad_layout(tmp_path: Path) -> None:
    base = tmp_path / "skin"
    for stem in ("ISIC_0000003", "ISIC_0000001"):
        write_image(base / "test" / "anomaly" / f"{stem}.jpg")
        write_mask(base / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{stem}_Segmentation.png")
    write_image(base / "test" / "good" / "n0.png")
    dataset = load_isic(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("skin", "anomaly", 1, "ISIC_0000001.jpg", "ISIC_0000001_Segmentation.png"),
        ("skin", "anomaly", 1, "ISIC_0000003.jpg", "ISIC_0000003_Segmentation.png"),
        ("skin", "good", 0, "n0.png", None),
    ]


def test_isic_raw_layout(tmp_path: Path) -> None:
    write_image(tmp_path / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000000.jpg")
    write_mask(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000000_Segmentation.png")
    dataset = load_isic(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [("skin", "defect", 1, "ISIC_0000000.jpg", "ISIC_0000000_Segmentation.png")]


def test_isic_missing_ground_truth(tmp_path: Path) -> None:
    write_image(tmp_path / "skin" / "test" / "anomaly" / "ISIC_0000000.jpg")
    gt = tmp_path / "skin" / "ISBI2016_ISIC_Part1_Test_GroundTruth"
    assert_layout_error(lambda: load_isic(tmp_path), gt)


@pytest.mark.parametrize(
    ("loader", "image_ext", "mask_ext"),
    [(load_clinicdb, ".png", ".png"), (load_colondb, ".png", ".png"), (load_kvasir, ".jpg", ".jpg")],
)
def test_colon_sets(tmp_path: Path, loader: Callable[..., Dataset], image_ext: str, mask_ext: str) -> None:
    for stem in ("2", "1", "10"):
        write_image(tmp_path / "images" / f"{stem}{image_ext}")
        write_mask(tmp_path / "masks" / f"{stem}{mask_ext}")
    dataset = loader(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("colon", "defect", 1, f"1{image_ext}", f"1{mask_ext}"),
        ("colon", "defect", 1, f"10{image_ext}", f"10{mask_ext}"),
        ("colon", "defect", 1, f"2{image_ext}", f"2{mask_ext}"),
    ]


def test_clinicdb_original_release_layout(tmp_path: Path) -> None:
    write_image(tmp_path / "Original" / "1.tif")
    write_mask(tmp_path / "Ground Truth" / "1.tif")
    assert summary(load_clinicdb(tmp_path)) == [("colon", "defect", 1, "1.tif", "1.tif")]


def test_colon_missing_masks(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "1.png")
    assert_layout_error(lambda: load_kvasir(tmp_path), tmp_path / "masks")


def test_endo(tmp_path: Path) -> None:
    for stem in ("b", "a"):
        write_image(tmp_path / "images" / f"{stem}.jpg")
        write_mask(tmp_path / "masks" / f"{stem}.png")
    write_image(tmp_path / "good" / "n.jpg")
    (tmp_path / "meta.json").write_text("{}")
    dataset = load_endo(tmp_path)
    assert_well_formed(dataset)
    assert summary(dataset) == [
        ("colon", "good", 0, "n.jpg", None),
        ("colon", "images", 1, "a.jpg", "a.png"),
        ("colon", "images", 1, "b.jpg", "b.png"),
    ]


def test_endo_missing_masks(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg")
    assert_layout_error(lambda: load_endo(tmp_path), tmp_path / "masks")


# --------------------------------------------------------------------------------------------------
# Generic folder format
# --------------------------------------------------------------------------------------------------


def test_folder_masks_beside_images(tmp_path: Path) -> None:
    root = tmp_path / "screw"
    write_image(root / "good" / "g1.PNG")
    write_image(root / "good" / "g0.jpeg")
    write_image(root / "scratch" / "s0.png")
    write_mask(root / "scratch" / "s0_mask.png")
    write_image(root / "scratch" / "s1.TIFF")  # anomalous, no mask
    dataset = load_folder(root)
    assert dataset.features == LOADER_FEATURES
    assert summary(dataset) == [
        ("screw", "good", 0, "g0.jpeg", None),
        ("screw", "good", 0, "g1.PNG", None),
        ("screw", "scratch", 1, "s0.png", "s0_mask.png"),
        ("screw", "scratch", 1, "s1.TIFF", None),
    ]


@pytest.mark.parametrize("mask_name", ["{stem}.png", "{stem}_mask.png"])
def test_folder_masks_in_ground_truth_mirror(tmp_path: Path, mask_name: str) -> None:
    root = tmp_path / "pcb"
    write_image(root / "good" / "0.bmp")
    write_image(root / "missing" / "7.jpg")
    write_mask(root / "ground_truth" / "missing" / mask_name.format(stem="7"))
    dataset = load_folder(root)
    assert_well_formed(dataset)
    assert dataset[1]["mask_path"] == str(root / "ground_truth" / "missing" / mask_name.format(stem="7"))


def test_folder_with_categories(tmp_path: Path) -> None:
    for category in ("nut", "bolt"):
        write_image(tmp_path / category / "good" / "0.png")
        write_image(tmp_path / category / "crack" / "0.png")
        write_mask(tmp_path / category / "ground_truth" / "crack" / "0_mask.png")
    dataset = load_folder(tmp_path)
    assert_well_formed(dataset)
    assert [row[:3] for row in summary(dataset)] == [
        ("bolt", "crack", 1),
        ("bolt", "good", 0),
        ("nut", "crack", 1),
        ("nut", "good", 0),
    ]
    assert column(load_folder(tmp_path, ["nut"]), "category") == ["nut", "nut"]
    with pytest.raises(ValueError, match="available: bolt, nut"):
        load_folder(tmp_path, ["screw"])


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no image folders"):
        load_folder(tmp_path)


# --------------------------------------------------------------------------------------------------
# Registry and shared error behaviour
# --------------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert list(DATASET_LOADERS) == [
        "mvtec", "visa", "mpdd", "btad", "ksdd2", "dagm", "dtd", "headct",
        "brainmri", "br35h", "isic", "clinicdb", "colondb", "kvasir", "endo", "folder", "mvtec-layout",
    ]  # fmt: skip
    assert len(loaders.MVTEC_CATEGORIES) == 15 and len(loaders.VISA_CATEGORIES) == 12


def test_load_benchmark_dispatch_and_aliases(mvtec_root: Path) -> None:
    assert len(load_benchmark("MVTec", mvtec_root, categories=["bottle"])) == 4
    make_mvtec_style(mvtec_root / "sdd", "electrical commutators", {"defect": ["0"]})
    assert len(load_benchmark("SDD", mvtec_root / "sdd")) == 2


def test_load_benchmark_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mvtech'; known datasets: mvtec, visa, .*folder"):
        load_benchmark("mvtech", "/nowhere")


@pytest.mark.parametrize("name", list(DATASET_LOADERS))
def test_missing_root_is_a_layout_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "not_there"
    assert_layout_error(lambda: load_benchmark(name, root), root)


def test_mvtec_layout_discovers_categories(tmp_path: Path) -> None:
    """Any category names in the MVTec layout (the synthetic benchmark uses brick, grass, gravel)."""
    make_mvtec_style(tmp_path, "brick", {"scratch": ["000", "001"]})
    make_mvtec_style(tmp_path, "grass", {"hole": ["000"]})
    dataset = loaders.load_mvtec_layout(tmp_path)
    assert sorted(set(dataset["category"])) == ["brick", "grass"]
    anomalous = [row for row in dataset if row["label"] == 1]
    assert {row["defect_type"] for row in anomalous} == {"scratch", "hole"}
    assert all(row["mask_path"].endswith("_mask.png") for row in anomalous)
    assert len(loaders.load_mvtec_layout(tmp_path, categories=["grass"])) == len(
        [r for r in dataset if r["category"] == "grass"]
    )
    with pytest.raises(DatasetLayoutError, match="no category folder"):
        loaders.load_mvtec_layout(tmp_path / "brick" / "ground_truth")
