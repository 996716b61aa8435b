# SPDX-License-Identifier: Apache-2.0
"""Tests of mrad_hf.data.synthetic: MVTec layout, determinism, exact masks, overwrite policy,
manifest."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrad_hf.data import synthetic
from mrad_hf.data.synthetic import (
    DEFECT_KINDS,
    SYNTHETIC_CATEGORIES,
    load_texture,
    make_synthetic_benchmark,
    paste_defect,
    sample_normal_image,
)

SMALL = dict(
    categories=("brick", "gravel"),
    n_train_good=2,
    n_test_good=2,
    n_test_per_defect=2,
    image_size=64,
    seed=3,
)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_benchmark(tmp_path_factory.mktemp("synthetic") / "bench", **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel maximum absolute difference over the channels."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


# --------------------------------------------------------------------------------------------
# Layout, manifest, determinism, overwrite
# --------------------------------------------------------------------------------------------


def test_layout_is_exactly_mvtec(benchmark: Path) -> None:
    expected = {"README.txt", "manifest.json"}
    for category in SMALL["categories"]:
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(2)}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(2)}
        for kind in DEFECT_KINDS:
            expected |= {f"{category}/test/{kind}/{i:03d}.png" for i in range(2)}
            expected |= {f"{category}/ground_truth/{kind}/{i:03d}_mask.png" for i in range(2)}
    assert set(_files(benchmark)) == expected  # no temporary files left, no mask for good
    assert sorted(p.name for p in benchmark.iterdir() if p.is_dir()) == list(SMALL["categories"])


def test_images_and_masks_have_the_right_format(benchmark: Path) -> None:
    for image_path in benchmark.rglob("test/*/*.png"):
        image = _read(image_path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        kind = image_path.parent.name
        mask_path = benchmark / image_path.parts[-4] / "ground_truth" / kind / f"{image_path.stem}_mask.png"
        if kind == "good":
            assert not mask_path.exists()
            continue
        with Image.open(mask_path) as mask_image:
            assert mask_image.mode == "L"
        mask = _read(mask_path)
        assert mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255}  # binary and non-empty
        assert (mask > 0).mean() < 0.2


def test_masks_on_disk_match_the_changed_pixels(benchmark: Path) -> None:
    # Rebuild each clean image from the same per-sample generator the writer used.
    for category in SMALL["categories"]:
        texture = load_texture(category)
        for kind in DEFECT_KINDS:
            for index in range(2):
                rng = synthetic._sample_rng(SMALL["seed"], category, f"test/{kind}", index)
                clean = sample_normal_image(texture, rng, 64)
                defective = _read(benchmark / category / "test" / kind / f"{index:03d}.png")
                mask = _read(benchmark / category / "ground_truth" / kind / f"{index:03d}_mask.png") > 0
                diff = _abs_diff(defective, clean)
                assert diff[~mask].max() == 0, (category, kind, index)
                assert diff[mask].mean() > 10 * max(diff[~mask].mean(), 1.0)


def test_manifest_is_consistent_with_the_files(benchmark: Path) -> None:
    manifest = json.loads((benchmark / "manifest.json").read_text())
    assert manifest["generator"] == "mrad_hf.data.synthetic"
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert manifest["seed"] == SMALL["seed"]
    assert manifest["parameters"]["image_size"] == 64
    assert manifest["parameters"]["categories"] == list(SMALL["categories"])
    entries = manifest["files"]
    listed_images = {entry["image"] for entry in entries}
    listed_masks = {entry["mask"] for entry in entries if entry["mask"] is not None}
    on_disk = set(_files(benchmark)) - {"README.txt", "manifest.json"}
    assert listed_images | listed_masks == on_disk
    assert len(entries) == len(listed_images) == 2 * (2 + 2 + 2 * len(DEFECT_KINDS))
    for entry in entries:
        parts = entry["image"].split("/")
        assert parts[0] == entry["category"] and parts[1] == entry["split"] and parts[2] == entry["defect"]
        assert entry["label"] == int(entry["defect"] != "good")
        assert (entry["mask"] is None) == (entry["defect"] == "good")
    readme = (benchmark / "README.txt").read_text()
    assert "CC0" in readme and "seed 3" in readme and synthetic.GENERATOR_VERSION in readme


def test_same_seed_gives_the_same_bytes_and_other_seeds_differ(tmp_path: Path, benchmark: Path) -> None:
    again = make_synthetic_benchmark(tmp_path / "again", **SMALL)
    assert _files(again) == _files(benchmark)
    other = make_synthetic_benchmark(tmp_path / "other", **{**SMALL, "seed": 4, "categories": ("brick",)})
    first = "brick/test/blob/000.png"
    assert _files(other)[first] != _files(benchmark)[first]


def test_a_category_does_not_depend_on_the_others(tmp_path: Path, benchmark: Path) -> None:
    alone = make_synthetic_benchmark(tmp_path / "alone", **{**SMALL, "categories": ("gravel",)})
    alone_files = _files(alone)
    full_files = _files(benchmark)
    for name, content in alone_files.items():
        if name.startswith("gravel/"):
            assert full_files[name] == content


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    options = {**SMALL, "categories": ("grass",), "defect_kinds": ("hole",), "n_train_good": 1}
    root = make_synthetic_benchmark(tmp_path / "bench", **options)
    before = _files(root)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_benchmark(root, **options)
    assert _files(root) == before
    (root / "notes.txt").write_text("keep me")
    # Overwriting removes the categories of the earlier manifest, keeps unrelated files.
    make_synthetic_benchmark(root, **{**options, "categories": ("brick",)}, overwrite=True, progress=True)
    files = _files(root)
    assert files["notes.txt"] == b"keep me"
    assert not any(name.startswith("grass/") for name in files)
    assert "brick/test/hole/000.png" in files
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_benchmark(occupied, **options)


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="categories"):
        make_synthetic_benchmark(tmp_path / "a", categories=("bottle",))
    with pytest.raises(ValueError, match="defect_kinds"):
        make_synthetic_benchmark(tmp_path / "b", defect_kinds=("crack",))
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_benchmark(tmp_path / "c", image_size=8)
    with pytest.raises(ValueError, match="Unknown synthetic category"):
        load_texture("bottle")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------
# Textures, normal samples and in-memory defects
# --------------------------------------------------------------------------------------------


def test_textures_and_normal_samples() -> None:
    for category in SYNTHETIC_CATEGORIES:
        texture = load_texture(category)
        assert texture.shape == (512, 512, 3) and texture.dtype == np.uint8
        assert texture.std() > 10  # a real texture, not a flat colour
    rng = np.random.default_rng(0)
    texture = load_texture("grass")
    first = sample_normal_image(texture, rng, 48)
    second = sample_normal_image(texture, rng, 48)
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert _abs_diff(first, second).mean() > 5  # normal images vary
    again = sample_normal_image(texture, np.random.default_rng(0), 48)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_paste_defect_changes_exactly_the_masked_pixels(category: str, kind: str) -> None:
    rng = np.random.default_rng([zlib.crc32(category.encode()), zlib.crc32(kind.encode())])
    texture = load_texture(category)
    for _ in range(3):
        clean = sample_normal_image(texture, rng, 96)
        untouched = clean.copy()
        defective, mask = paste_defect(clean, kind, rng)
        np.testing.assert_array_equal(clean, untouched)  # the input is not modified
        assert defective.shape == clean.shape and defective.dtype == np.uint8
        assert mask.shape == clean.shape[:2] and mask.dtype == bool
        assert 0 < mask.sum() < 0.2 * mask.size
        diff = _abs_diff(defective, clean)
        assert diff[~mask].max() == 0  # no change outside the mask
        assert diff[mask].mean() > 20  # clearly visible
        assert (diff[mask] >= 5).mean() > 0.9  # the mask is (almost) all changed pixels
        assert (diff[mask] == 255).mean() < 0.5  # not a saturated stamp


def test_defects_look_like_their_names() -> None:
    rng = np.random.default_rng(5)
    clean = sample_normal_image(load_texture("gravel"), rng, 128)
    luminance = clean.astype(float).mean(axis=-1)
    hole, hole_mask = paste_defect(clean, "hole", rng)
    assert hole.astype(float).mean(axis=-1)[hole_mask].mean() < 0.75 * luminance[hole_mask].mean()
    _, scratch_mask = paste_defect(clean, "scratch", rng)
    assert scratch_mask.mean() < 0.02  # thin
    source = np.zeros((64, 64, 3), dtype=np.uint8)
    source[...] = (200, 40, 40)
    pasted, paste_mask = paste_defect(clean, "cutpaste", rng, source=source)
    rows, cols = np.nonzero(paste_mask)
    assert paste_mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a rectangle
    colours = np.unique(pasted[paste_mask], axis=0)
    assert len(colours) == 1 and colours[0][0] > colours[0][1]  # copied (and re-lit) from source


def test_paste_defect_is_deterministic_and_validates_input() -> None:
    clean = sample_normal_image(load_texture("brick"), np.random.default_rng(1), 64)
    first = paste_defect(clean, "blob", np.random.default_rng(9))
    second = paste_defect(clean, "blob", np.random.default_rng(9))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    with pytest.raises(ValueError, match="Unknown defect kind"):
        paste_defect(clean, "crack", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        paste_defect(clean.astype(np.float32), "blob", np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB"):
        paste_defect(clean[..., 0], "blob", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least"):
        paste_defect(clean[:8, :8], "blob", np.random.default_rng(0))
