# SPDX-License-Identifier: Apache-2.0
"""The generic folder layout and explicit folders: what is an image, what is a mask, what is normal (issue 12 §2)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrad_hf.data.loaders import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    IgnoredFilesWarning,
    classify_file,
    load_benchmark,
    load_folder,
    load_folders,
    scan_folder,
)


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value,) * 3).save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def write_mask(path: Path, size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, : size[0] // 2] = 255
    Image.fromarray(array).save(path)
    return path


def rows_of(dataset) -> list[tuple[str, int, str | None]]:
    """(id, label, mask file name) per row, sorted by id."""
    return sorted(
        (row["id"], row["label"], None if row["mask_path"] is None else Path(row["mask_path"]).name)
        for row in dataset.select_columns(["id", "label", "mask_path"])
    )


@pytest.mark.parametrize("mask_folder", ["masks", "ground_truth", "GT"])
def test_mirrored_mask_folder_pairs_every_mask(tmp_path: Path, mask_folder: str) -> None:
    root = tmp_path / "screw"
    write_image(root / "good" / "000.png")
    write_image(root / "scratch" / "000.png")
    write_image(root / "crack" / "000.png")
    write_mask(root / mask_folder / "scratch" / "000.png")
    write_mask(root / mask_folder / "crack" / "000_mask.png")
    dataset = load_folder(root)
    assert rows_of(dataset) == [
        ("crack/000.png", 1, "000_mask.png"),
        ("good/000.png", 0, None),
        ("scratch/000.png", 1, "000.png"),
    ]
    assert [Path(p).parent.name for p in dataset["mask_path"] if p] == ["crack", "scratch"]
    assert set(dataset["defect_type"]) == {"good", "crack", "scratch"}  # the mask folder is not a defect class


def test_flat_mask_folder_is_masks_not_a_defect_class(tmp_path: Path) -> None:
    root = tmp_path / "pcb"
    write_image(root / "good" / "000.png")
    write_image(root / "bent" / "001.png")
    write_image(root / "bent" / "002.png")
    write_mask(root / "masks" / "001.png")
    write_mask(root / "masks" / "002_mask.png")
    dataset = load_folder(root)
    assert rows_of(dataset) == [
        ("bent/001.png", 1, "001.png"),
        ("bent/002.png", 1, "002_mask.png"),
        ("good/000.png", 0, None),
    ]
    assert not any("masks" in Path(path).parts for path in dataset["path"])  # no mask is ever scored


def test_flat_mask_claimed_by_two_defect_folders_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pcb"
    write_image(root / "good" / "000.png")
    write_image(root / "bent" / "001.png")
    write_image(root / "cut" / "001.png")
    write_mask(root / "masks" / "001.png")
    with pytest.raises(DatasetLayoutError, match=r"matches 2 images.*masks/<defect>/<stem>\.png"):
        load_folder(root)


def test_mask_beside_image_wins_and_orphan_masks_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "nut"
    write_image(root / "good" / "000.png")
    write_mask(root / "good" / "000_mask.png")  # a mask in a normal folder: never a mask of a normal image
    write_image(root / "dent" / "001.png")
    write_mask(root / "dent" / "001_mask.png")
    write_mask(root / "masks" / "dent" / "001.png")  # second placement: the one beside the image wins
    write_mask(root / "masks" / "dent" / "999.png")  # no image
    with pytest.warns(IgnoredFilesWarning) as caught:
        dataset = load_folder(root)
    assert rows_of(dataset) == [("dent/001.png", 1, "001_mask.png"), ("good/000.png", 0, None)]
    message = str(caught[0].message)
    assert message.count("\n") == 0 and "Ignored 3 file(s)" in message
    assert "1 mask in a folder of normal images" in message and "2 mask without a matching anomalous image" in message


def test_anomalous_image_without_mask_gets_none(tmp_path: Path) -> None:
    root = tmp_path / "nut"
    write_image(root / "good" / "000.png")
    write_image(root / "dent" / "001.png")
    write_image(root / "dent" / "002.png")
    write_mask(root / "masks" / "dent" / "001.png")
    assert rows_of(load_folder(root)) == [
        ("dent/001.png", 1, "001.png"),
        ("dent/002.png", 1, None),
        ("good/000.png", 0, None),
    ]


@pytest.mark.parametrize("normal", ["good", "normal", "nominal", "ok", "Nominal", "OK"])
def test_normal_folder_names(tmp_path: Path, normal: str) -> None:
    root = tmp_path / "textile"
    write_image(root / normal / "a.png")
    write_image(root / "hole" / "b.png")
    dataset = load_folder(root)
    assert sorted(zip(dataset["defect_type"], dataset["label"])) == [("good", 0), ("hole", 1)]


def test_conformal_clip_textile_layout_with_nominal_categories(tmp_path: Path) -> None:
    """conformal-clip-data keeps normals in nominal/: both classes must be found, per category."""
    for category in ("denim", "silk"):
        write_image(tmp_path / category / "nominal" / "n1.jpg")
        write_image(tmp_path / category / "nominal" / "n2.jpg")
        write_image(tmp_path / category / "local" / "a1.jpg")
    dataset = load_folder(tmp_path)
    assert sorted(set(dataset["category"])) == ["denim", "silk"]
    assert list(dataset["label"]).count(0) == 4 and list(dataset["label"]).count(1) == 2


def test_ids_are_relative_and_name_the_dataset(tmp_path: Path) -> None:
    root = tmp_path / "lines"
    write_image(root / "nut" / "good" / "0.png")
    write_image(root / "nut" / "dent" / "1.png")
    dataset = load_folder(root)
    assert list(dataset["id"]) == ["nut/dent/1.png", "nut/good/0.png"]
    assert list(dataset["dataset"]) == ["folder", "folder"]
    assert all(os.path.isabs(path) for path in dataset["path"])


def test_new_extensions_are_images(tmp_path: Path) -> None:
    assert {".webp", ".gif", ".jfif"} <= IMAGE_EXTENSIONS
    root = tmp_path / "cat"
    write_image(root / "good" / "a.webp")
    write_image(root / "good" / "b.gif")
    write_image(root / "good" / "c.JFIF")
    write_image(root / "dent" / "d.png")
    assert sorted(Path(p).name for p in load_folder(root)["path"]) == ["a.webp", "b.gif", "c.JFIF", "d.png"]


def test_ignored_inputs_are_reported_in_one_line(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cat"
    write_image(root / "good" / "a.png")
    locked = write_image(root / "good" / "locked.png")
    write_image(root / "dent" / "b.png")
    (root / "good" / "notes.txt").write_text("x")
    (root / "good" / "labels.json").write_text("{}")
    os.mkfifo(root / "good" / "pipe.png")
    os.symlink(root / "good" / "self.png", root / "good" / "self.png")  # a self-referencing link
    os.symlink(root / "good", root / "good" / "loop")  # a folder link back to its parent
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_folder(root)
    assert sorted(Path(p).name for p in dataset["path"]) == ["a.png", "b.png"]
    (message,) = [str(w.message) for w in caught if issubclass(w.category, IgnoredFilesWarning)]
    assert "\n" not in message and message.startswith("Ignored 6 file(s) under")
    for part in (
        "2 unsupported extension",
        "1 not a regular file (FIFO, socket or device)",
        "unreadable (permission denied)",
    ):
        assert part in message
    assert "2 symlink loop" in message


def test_scan_folder_recursive_does_not_follow_loops(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    scan = scan_folder(tmp_path)
    assert [p.name for p in scan.images] == ["x.png"]
    assert [item.reason for item in scan.ignored] == ["symlink loop"]


def test_classify_file_is_the_one_rule(tmp_path: Path) -> None:
    assert classify_file(tmp_path / "a" / "000.png", tmp_path) == "image"
    assert classify_file(tmp_path / "a" / "000_MASK.png", tmp_path) == "mask"
    assert classify_file(tmp_path / "Masks" / "000.png", tmp_path) == "mask"
    assert classify_file(tmp_path / "ground_truth" / "x" / "000.png", tmp_path) == "mask"
    assert classify_file(tmp_path / "a" / "000.txt", tmp_path) is None
    # only folders below the root count: a root that happens to be called masks/ is not a mask folder
    assert classify_file(tmp_path / "masks" / "000.png", tmp_path / "masks") == "image"


def test_cli_folder_collection_agrees_with_the_loader(tmp_path: Path, capsys) -> None:
    from mrad_hf.cli.common import _collect_images

    root = tmp_path / "screw"
    write_image(root / "good" / "000.png")
    write_image(root / "scratch" / "001.png")
    write_mask(root / "scratch" / "001_mask.png")
    write_image(root / "crack" / "002.png")
    write_mask(root / "masks" / "crack" / "002.png")
    write_mask(root / "masks" / "003.png")
    (root / "good" / "readme.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sorted(load_folder(root)["path"])
    collected = [str(path) for path in _collect_images([str(root)])]
    assert collected == loaded
    out = capsys.readouterr().out
    assert "3 ground-truth mask file(s)" in out and "1 unsupported extension" in out


# ---------------------------------------------------------------------- explicit folders
def make_anomalib_folder(root: Path) -> None:
    write_image(root / "line1" / "good" / "g1.png")
    write_image(root / "line2" / "good" / "g2.png")
    write_image(root / "defects" / "crack" / "c1.png")
    write_image(root / "defects" / "hole" / "h1.png")
    write_mask(root / "gt" / "crack" / "c1.png")
    write_mask(root / "gt" / "hole" / "h1_mask.png")


def test_explicit_folders_with_globs_and_paired_mask_dirs(tmp_path: Path) -> None:
    make_anomalib_folder(tmp_path)
    dataset = load_benchmark(
        "folder",
        tmp_path,
        normal_dirs=["line*/good"],
        abnormal_dirs=["defects/crack", "defects/hole"],
        mask_dirs=["gt/crack", "gt/hole"],
    )
    assert rows_of(dataset) == [
        ("defects/crack/c1.png", 1, "c1.png"),
        ("defects/hole/h1.png", 1, "h1_mask.png"),
        ("line1/good/g1.png", 0, None),
        ("line2/good/g2.png", 0, None),
    ]
    assert set(dataset["category"]) == {tmp_path.name} and list(dataset["defect_type"]) == [
        "crack",
        "good",
        "good",
        "hole",
    ]


def test_explicit_folders_pool_masks_and_read_beside_masks(tmp_path: Path) -> None:
    write_image(tmp_path / "ok" / "g.png")
    write_image(tmp_path / "ng" / "a.png")
    write_image(tmp_path / "ng" / "b.png")
    write_mask(tmp_path / "ng" / "b_mask.png")
    write_mask(tmp_path / "annotations" / "a.png")
    dataset = load_folders([tmp_path / "ok"], [tmp_path / "ng"], [tmp_path / "annotations"], category="fabric")
    assert rows_of(dataset) == [("ng/a.png", 1, "a.png"), ("ng/b.png", 1, "b_mask.png"), ("ok/g.png", 0, None)]
    assert set(dataset["category"]) == {"fabric"}


def test_explicit_folder_errors(tmp_path: Path) -> None:
    make_anomalib_folder(tmp_path)
    with pytest.raises(DatasetLayoutError, match="--abnormal-dir 'nothing\\*' matches no folder"):
        load_benchmark("folder", tmp_path, abnormal_dirs=["nothing*"])
    with pytest.raises(ValueError, match="use them with --dataset folder"):
        load_benchmark("mvtec", tmp_path, normal_dirs=["line1/good"])
    with pytest.raises(DatasetLayoutError, match="--mask-dir needs an --abnormal-dir"):
        load_benchmark("folder", tmp_path, normal_dirs=["line1/good"], mask_dirs=["gt/crack"])
    with pytest.raises(DatasetLayoutError, match="both a normal and an abnormal folder"):
        load_benchmark("folder", tmp_path, normal_dirs=["line1/good"], abnormal_dirs=["line*/good"])
