# SPDX-License-Identifier: Apache-2.0
"""Each row of the bad-input table in docs/reliability.md: the input is handled as documented, or refused with a
message that names the file and the fix, through the processor, the pipeline, `mrad predict`, `mrad build-bank`,
`mrad evaluate` and the dataset loaders. Folder runs skip and report a bad file (`--on-error skip`) or stop (`fail`)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_samples, make_tiny_model
from PIL import Image

from mrad_hf import MRADImageProcessor, MRADInputError, load_image
from mrad_hf.cli.main import main
from mrad_hf.data.loaders import iter_readable_rows, load_folder, load_ksdd2
from mrad_hf.memory import build_memory_bank, load_bank
from mrad_hf.models.mrad.image_processing_mrad import load_mask, preprocess_mask

from ._files import encode, texture, valid_image_bytes, write, write_folder_dataset

PROCESSOR = MRADImageProcessor(image_size=56)


def _error(source, *, mask=None) -> str:
    with pytest.raises(MRADInputError) as caught:
        PROCESSOR(source, masks=None if mask is None else mask)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- files that cannot be used
@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("empty.png", b"", "is empty (0 bytes). Re-export or remove it"),
        (
            "notes.png",
            b"these are meeting notes, not pixels\n" * 20,
            "is not a readable image (unknown or corrupt format)",
        ),
        (
            "random.jpg",
            np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
            "is not a readable image",
        ),
        ("truncated.png", valid_image_bytes()["png"][:300], "could not be decoded (OSError"),
        ("truncated.jpg", valid_image_bytes()["jpg"][:400], "could not be decoded (OSError"),
        ("truncated.tif", valid_image_bytes()["tif"][:500], "could not be decoded"),
        ("header_only.png", valid_image_bytes()["png"][:8], "not a readable image"),
    ],
)
def test_unreadable_files_name_the_file_and_the_fix(tmp_path, name, data, expected):
    path = write(tmp_path / name, data)
    message = _error(path)
    assert f"'{path}'" in message and expected in message


def test_missing_path_and_folder_passed_as_a_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing.png") and "Check the path" in _error(
        tmp_path / "missing.png"
    )
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    message = _error(folder)
    assert f"'{folder}' is a folder, not an image file" in message


def test_decompression_bomb_names_the_file_and_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 160 000 px > 2 x limit: PIL's hard error
    assert "too large to decode safely" in _error(path) and "MAX_IMAGE_PIXELS" in _error(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # between 1x and 2x: PIL only warns; we refuse too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "too large to decode safely" in _error(path)


def test_tiny_image_is_refused_with_the_minimum(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(texture(10, 30)).save(path)
    assert f"'{path}' is 30x10 pixels; MRAD needs at least 14x14" in _error(path)
    assert PROCESSOR(np.zeros((14, 14, 3), np.uint8))["pixel_values"].shape == (1, 3, 56, 56)  # one patch is enough


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((20, 20, 3), np.nan, np.float32), "NaN or infinite"),
        (np.full((20, 20), np.inf, np.float64), "NaN or infinite"),
        (np.full((20, 20), -5, np.int16), "negative pixel values"),
        (
            np.full((20, 20), 2.0, np.float32) * np.linspace(0, 300, 20, dtype=np.float32),
            "floats in [0, 600]; MRAD expects floats in [0, 1] or [0, 255]",
        ),
        (np.zeros((20, 20, 5), np.uint8), "expected an (H, W), (H, W, 3) or (H, W, 4) image array"),
        (np.zeros((2, 20, 20, 3), np.uint8), "expected an"),
        (np.zeros((20, 20), np.complex64), "unsupported dtype"),
    ],
)
def test_bad_arrays_are_refused(array, expected):
    assert expected in _error(array)


# ---------------------------------------------------------------- odd but valid files: handled
def _reference_pixels(image: Image.Image) -> torch.Tensor:
    return MRADImageProcessor(image_size=56, min_image_side=1)(image)["pixel_values"][0]


def test_wrong_extension_is_decoded_by_content(tmp_path):
    png_named_jpg = write(tmp_path / "actually_png.jpg", valid_image_bytes()["png"])
    jpeg_named_tif = write(tmp_path / "actually_jpeg.tif", valid_image_bytes()["jpg"])
    assert torch.equal(PROCESSOR(png_named_jpg)["pixel_values"][0], _reference_pixels(Image.fromarray(texture())))
    assert load_image(jpeg_named_tif).size == (64, 48)


def test_exif_orientation_is_applied(tmp_path):
    array = texture(20, 40)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise on display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=100)
    upright = load_image(path)
    assert upright.size == (20, 40)
    np.testing.assert_allclose(
        np.asarray(upright, np.float32),
        np.rot90(np.asarray(load_image(path, exif_transpose=False), np.float32)),
        atol=0,
    )


def test_corrupt_exif_is_refused_and_an_invalid_orientation_ignored(tmp_path):
    image = Image.fromarray(texture(20, 30))
    corrupt = tmp_path / "corrupt_exif.jpg"
    image.save(corrupt, exif=b"Exif\x00\x00" + b"\xff" * 40)  # exif_transpose raises SyntaxError on it
    assert f"'{corrupt}' has a corrupt EXIF block" in _error(corrupt) and "without EXIF" in _error(corrupt)
    odd = tmp_path / "orientation_9.jpg"
    exif = image.getexif()
    exif[0x0112] = 9  # not one of the 8 orientations: PIL leaves the image as stored
    image.save(odd, exif=exif)
    assert load_image(odd).size == (30, 20)


@pytest.mark.parametrize(
    "make, expected_mode, expected_pixel",
    [
        (lambda: Image.fromarray(np.full((30, 30), 90, np.uint8)).convert("P"), "RGB", (90, 90, 90)),
        (lambda: Image.new("CMYK", (30, 30), (0, 255, 0, 0)), "RGB", (255, 0, 255)),
        (lambda: Image.fromarray(np.full((30, 30), 257 * 200, np.uint16)), "L", 200),
        (lambda: Image.fromarray(np.full((30, 30), 0.25, np.float32), "F"), "L", 64),
        (lambda: Image.fromarray(np.full((30, 30), 70, np.uint8), "L"), "L", 70),
        (lambda: Image.fromarray(np.full((30, 30, 4), 100, np.uint8), "RGBA"), "RGBA", (100, 100, 100, 100)),
        (lambda: Image.fromarray(np.full((30, 30, 2), 100, np.uint8), "LA"), "LA", (100, 100)),
        (lambda: Image.new("1", (30, 30), 1), "L", 255),
    ],
    ids=["palette", "cmyk", "16-bit", "float-0-1", "grayscale", "rgba", "la", "1-bit"],
)
@pytest.mark.parametrize("container", ["TIFF", "memory"])
def test_unusual_modes_and_depths_are_normalised(tmp_path, make, expected_mode, expected_pixel, container):
    image = make()
    if container == "TIFF":
        path = tmp_path / "odd.tif"
        image.save(path, "TIFF")
        image = path
    loaded = load_image(image)
    assert loaded.mode == expected_mode and loaded.getpixel((3, 3)) == expected_pixel
    pixels = PROCESSOR(image)["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()


def test_float_tiff_out_of_range_or_nan_is_refused(tmp_path):
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.linspace(-3, 3, 900, dtype=np.float32).reshape(30, 30), "F").save(wide)
    assert f"'{wide}'" in _error(wide) and "floats in [-3, 3]" in _error(wide)
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((30, 30), np.nan, np.float32), "F").save(nan)
    assert f"'{nan}'" in _error(nan) and "NaN or infinite" in _error(nan)


def test_grayscale_and_rgba_follow_the_reference_order(tmp_path):
    """Resize in the image's own mode, then convert to RGB (what the reference's PIL transforms do)."""
    rgba = Image.fromarray(np.dstack([texture(30, 40), np.full((30, 40), 128, np.uint8)]), "RGBA")
    expected = torch.from_numpy(
        np.asarray(rgba.resize((56, 56), Image.Resampling.BICUBIC).convert("RGB"), np.float32) / 255
    )
    got = PROCESSOR(rgba)["pixel_values"][0]
    mean, std = torch.tensor(PROCESSOR.image_mean).view(3, 1, 1), torch.tensor(PROCESSOR.image_std).view(3, 1, 1)
    torch.testing.assert_close(got * std + mean, expected.permute(2, 0, 1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- masks
def test_mask_modes_binarise_like_the_reference(tmp_path):
    base = np.zeros((20, 20), np.uint8)
    base[5:10, 5:10] = 1
    palette = Image.fromarray(base * 3, "L").convert("P")
    rgb = Image.fromarray(np.dstack([base * 255, base * 0, base * 0]), "RGB")
    sixteen = Image.fromarray(base.astype(np.uint16))  # defect id 1 in a 16-bit mask: anomalous, not rounded away
    floats = Image.fromarray(base.astype(np.float32) * 0.7, "F")
    for mask in (palette, rgb, sixteen, floats, base.astype(bool), base * 7):
        np.testing.assert_array_equal(load_mask(mask), base > 0)
    path = tmp_path / "mask16.png"
    sixteen.save(path)
    np.testing.assert_array_equal(load_mask(path), base > 0)


def test_bad_masks_are_refused_naming_mask_and_image(tmp_path):
    image = write(tmp_path / "part.png", encode(Image.fromarray(texture(48, 64)), "PNG"))
    small = tmp_path / "part_mask.png"
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(small)
    message = _error([image], mask=[small])
    assert (
        f"Mask '{small}' is 32x24 but its image '{image}' is 64x48" in message and "Fix or remove the mask" in message
    )
    corrupt = write(tmp_path / "corrupt_mask.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert f"'{corrupt}' (a mask)" in _error([image], mask=[corrupt])
    assert "contains NaN" in _error([image], mask=[np.full((48, 64), np.nan)])
    assert "single-channel (H, W) mask" in _error([image], mask=[np.zeros((48, 64, 3))])
    assert preprocess_mask(np.zeros((48, 64), bool), 56).sum() == 0


# ---------------------------------------------------------------- folder runs: CLI and loaders
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A saved tiny model, and a user folder (`folder` layout) with one broken image, one broken mask and one folder named *.png."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    make_tiny_model().save_pretrained(model_dir)
    data = write_folder_dataset(root / "data" / "widget", make_samples(6, seed=31))
    write(data / "good" / "900_broken.png", valid_image_bytes()["png"][:200])
    (data / "good" / "901_folder.png").mkdir()
    write(data / "scratch" / "902.png", encode(Image.fromarray(texture(100, 120)), "PNG"))
    write(
        data / "scratch" / "902_mask.png", encode(Image.fromarray(np.zeros((10, 10), np.uint8)), "PNG")
    )  # wrong size
    return model_dir, data


def _error_line(capsys, command):
    """The one error line of a failed command (a progress bar interrupted by the error may precede it on its line)."""
    marker = f"mrad {command}: error:"
    lines = [line[line.index(marker) :] for line in capsys.readouterr().err.splitlines() if marker in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_loader_rows_skip_and_report_unreadable_files(cli_setup):
    _, data = cli_setup
    dataset = load_folder(data)
    assert len(dataset) == 8  # the folder named 901_folder.png is not listed
    failures = []
    rows = list(iter_readable_rows(dataset, MRADImageProcessor(image_size=56).load_pair, failures=failures))
    assert len(rows) == 6 and all(isinstance(row["image"], Image.Image) for row in rows)
    assert sorted(f["path"].rsplit("/", 1)[1] for f in failures) == ["900_broken.png", "902.png"]
    assert any("902_mask.png" in f["error"] and "masks must have the image's size" in f["error"] for f in failures)
    with pytest.raises(MRADInputError, match="900_broken.png"):
        list(iter_readable_rows(dataset, MRADImageProcessor(image_size=56).load_pair, on_error="fail"))


def test_ksdd2_unreadable_ground_truth_names_the_file(tmp_path):
    split = tmp_path / "ksdd2" / "test"
    Image.fromarray(texture()).save(split.mkdir(parents=True) or split / "10000.png")
    write(split / "10000_GT.png", b"broken")
    with pytest.raises(MRADInputError, match="10000_GT.png"):
        load_ksdd2(tmp_path / "ksdd2")


def test_build_bank_skips_and_reports_or_fails(cli_setup, tmp_path, capsys):
    model_dir, data = cli_setup
    bank_path = tmp_path / "bank.safetensors"
    args = [
        "build-bank",
        "--model",
        str(model_dir),
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--output",
        str(bank_path),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SKIPPED 2 file(s)" in printed and "skipped_files" in printed
    bank = load_bank(bank_path)
    assert bank.counts()["image_entries"] == 6
    assert sorted(f["path"].rsplit("/", 1)[1] for f in bank.metadata["skipped_files"]) == ["900_broken.png", "902.png"]
    assert not any("900_broken" in image_id for image_id in bank.metadata["image_ids"])
    assert main(args + ["--on-error", "fail"]) == 2
    line = _error_line(capsys, "build-bank")
    assert "900_broken.png" in line and "--on-error skip" in line


def test_evaluate_skips_and_reports_or_fails(cli_setup, tmp_path, capsys):
    model_dir, data = cli_setup
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--model",
        str(model_dir),
        "--bank-from",
        "folder",
        "--bank-root",
        str(data),
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "--heatmaps",
        "0",
    ]
    assert main(args) == 0
    assert "SKIPPED 2 file(s)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert sorted(f["path"].rsplit("/", 1)[1] for f in results["skipped_files"]) == ["900_broken.png", "902.png"]
    assert results["per_category"][0]["images"] == 6 and math.isfinite(results["mean"]["image_auroc"])
    record = json.loads((out / "per_category" / "widget.json").read_text())
    assert len(record["scores"]) == 6 and len(record["skipped"]) == 2
    assert main(args + ["--no-resume", "--on-error", "fail"]) == 2
    assert "900_broken.png" in _error_line(capsys, "evaluate")


def test_predict_skips_and_reports_or_fails(cli_setup, tmp_path, capsys):
    model_dir, data = cli_setup
    bank = tmp_path / "bank.safetensors"
    assert (
        main(
            [
                "build-bank",
                "--model",
                str(model_dir),
                "--dataset",
                "folder",
                "--data-root",
                str(data),
                "--output",
                str(bank),
            ]
        )
        == 0
    )
    text_file = write(tmp_path / "readme.txt", b"not an image")
    out = tmp_path / "predict"
    args = [
        "predict",
        "--model",
        str(model_dir),
        "--bank",
        str(bank),
        str(data / "good"),
        str(text_file),
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Scored 3 of 5 image(s)" in printed and "SKIPPED 2 file(s)" in printed
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scored"] == 3 and summary["failed"] == 2
    assert {f["path"] for f in summary["failures"]} == {str(data / "good" / "900_broken.png"), str(text_file)}
    assert (
        all(math.isfinite(r["score"]) for r in summary["results"]) and len(list((out / "heatmaps").glob("*.png"))) == 3
    )
    assert main(args + ["--on-error", "fail"]) == 2
    assert "900_broken.png" in _error_line(capsys, "predict")
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "nothing.png")]) == 2
    assert "neither an image file nor a folder" in _error_line(capsys, "predict")


def test_pipeline_raises_the_same_clean_error(tmp_path):
    from transformers import pipeline

    model = make_tiny_model()
    build_memory_bank(model, make_samples(4), progress=False)
    detector = pipeline("anomaly-detection", model=model, image_processor=MRADImageProcessor.from_config(model.config))
    broken = write(tmp_path / "broken.jpg", valid_image_bytes()["jpg"][:100])
    with pytest.raises(MRADInputError, match=r"broken\.jpg"):
        detector(str(broken))
    rgba16 = tmp_path / "deep.tif"
    Image.fromarray((texture()[..., 0].astype(np.uint16) * 257)).save(rgba16)
    result = detector(str(rgba16))
    assert math.isfinite(result["score"]) and result["anomaly_map"].shape == (48, 64)
