# SPDX-License-Identifier: Apache-2.0
"""Preprocessing equals the reference transforms; every kind of bad input gets a clear error or is handled."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mrad_hf import MRADImageProcessor, MRADInputError, load_image
from mrad_hf.models.mrad.configuration_mrad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mrad_hf.models.mrad.image_processing_mrad import preprocess_image, preprocess_mask


def _expected_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The reference: Resize((S, S), BICUBIC) on the PIL image, convert('RGB'), ToTensor, Normalize."""
    array = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    return ((array - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)).transpose(2, 0, 1)


def test_image_is_stretched_not_cropped():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 150, 3), dtype=np.uint8))
    out = preprocess_image(image, 112)
    assert out.shape == (3, 112, 112)
    np.testing.assert_allclose(out.numpy(), _expected_pixels(image, 112), atol=1e-6)
    # a centre crop of the short side would lose the left/right borders; the stretch keeps them
    left_border = np.asarray(image)[:, :5].mean()
    assert abs(left_border - np.asarray(image.resize((112, 112), Image.Resampling.BICUBIC))[:, :3].mean()) < 40


def test_grayscale_resized_before_rgb_conversion_equals_reference():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70), dtype=np.uint8), mode="L")
    np.testing.assert_allclose(preprocess_image(load_image(image), 56).numpy(), _expected_pixels(image, 56), atol=1e-6)


def test_mask_preprocessing_reference_semantics():
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, 5:15] = 1  # VisA-style non-binary values count as anomalous (> 0)
    out = preprocess_mask(mask, 40)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out[20, 20] == 1 and out[0, 0] == 0
    assert out.sum().item() == pytest.approx(400, abs=40)  # 10x10 area scaled by 4
    assert preprocess_mask(None, 8).sum() == 0


@pytest.mark.parametrize(
    "make, expected_mode",
    [
        (lambda: Image.fromarray(np.full((30, 30, 4), 200, np.uint8), "RGBA"), "RGBA"),
        (lambda: Image.fromarray(np.full((30, 30), 100, np.uint8), "L").convert("P"), "RGB"),
        (lambda: Image.new("CMYK", (30, 30), (0, 0, 0, 0)), "RGB"),
        (lambda: Image.new("1", (30, 30), 1), "L"),
        (lambda: Image.fromarray(np.full((30, 30), 65535, np.uint16)), "L"),
        (lambda: Image.fromarray(np.full((30, 30), 0.5, np.float32), "F"), "L"),
    ],
)
def test_unusual_modes_are_normalised(make, expected_mode):
    image = load_image(make())
    assert image.mode == expected_mode
    assert preprocess_image(image, 28).shape == (3, 28, 28)


def test_sixteen_bit_scaling_and_float_arrays():
    assert np.asarray(load_image(np.full((20, 20), 65535, np.uint16)))[0, 0] == 255
    assert np.asarray(load_image(np.full((20, 20), 257 * 10, np.uint16)))[0, 0] == 10
    assert np.asarray(load_image(np.full((20, 20, 3), 1.0, np.float32)))[0, 0, 0] == 255
    assert np.asarray(load_image(np.full((3, 20, 20), 128, np.uint8))).shape == (20, 20, 3)  # CHW accepted
    with pytest.raises(MRADInputError, match="NaN or infinite"):
        load_image(np.full((20, 20), np.nan, np.float32))
    with pytest.raises(MRADInputError, match=r"floats in \[-1, 1\]"):
        load_image(np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20))
    with pytest.raises(MRADInputError, match="expected an"):
        load_image(np.zeros((20, 20, 5), np.uint8))


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MRADInputError, match="empty.png.*0 bytes"):
        load_image(empty)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(MRADInputError, match="garbage.jpg.*not a readable image"):
        load_image(garbage)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(MRADInputError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(MRADInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    wrong_extension = tmp_path / "actually_png.jpg"
    wrong_extension.write_bytes(buffer.getvalue())
    assert load_image(wrong_extension).size == (64, 64)  # decoded by content, not by extension
    with pytest.raises(MRADInputError, match="Unsupported image input"):
        load_image(12345)


def test_decompression_bomb_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MRADInputError, match="big.png.*too large.*MAX_IMAGE_PIXELS"):
            load_image(path)


def test_processor_batches_sizes_masks_and_rejects_tiny_images():
    processor = MRADImageProcessor(image_size=56)
    images = [np.zeros((30, 40, 3), np.uint8), np.zeros((50, 20), np.uint8)]
    masks = [None, np.ones((50, 20), bool)]
    batch = processor(images, masks=masks)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert batch["original_sizes"].tolist() == [[30, 40], [50, 20]]
    assert batch["masks"][0].sum() == 0 and batch["masks"][1].sum() == 56 * 56
    with pytest.raises(MRADInputError, match="5x5 pixels.*at least 14x14"):
        processor(np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(MRADInputError, match="masks must have the image's size"):
        processor(images[0], masks=np.ones((10, 10), bool))
    with pytest.raises(MRADInputError, match="2 images but 1 masks"):
        processor(images, masks=[None])


def test_processor_round_trip(tmp_path):
    processor = MRADImageProcessor(image_size=84, mask_threshold=0.4)
    processor.save_pretrained(tmp_path)
    again = MRADImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    image = np.random.default_rng(0).integers(0, 256, (33, 44, 3), dtype=np.uint8)
    assert torch.equal(again(image)["pixel_values"], processor(image)["pixel_values"])


def test_mask_resize_keeps_edges_in_place():
    """An off-by-one (or a nearest/align_corners change) in the mask resize moves this edge and fails here."""
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[:, :50] = 255
    out = preprocess_mask(mask, 200).numpy()
    assert out[:, :100].all() and not out[:, 100:].any()
    odd = preprocess_mask(mask, 518).numpy()  # the reference size: edge at 259 = 518 / 2
    assert odd[:, :259].all() and not odd[:, 259:].any()


def test_bytes_and_datasets_style_sources(tmp_path):
    """`load_image` takes raw bytes and datasets' undecoded `{"path", "bytes"}` values; errors name the path."""
    buffer = io.BytesIO()
    array = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, "PNG")
    np.testing.assert_array_equal(np.asarray(load_image(buffer.getvalue())), array)
    np.testing.assert_array_equal(np.asarray(load_image({"path": "in/zip.png", "bytes": buffer.getvalue()})), array)
    path = tmp_path / "on_disk.png"
    path.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(np.asarray(load_image({"path": str(path), "bytes": None})), array)
    with pytest.raises(MRADInputError, match=r"'in/zip.png' could not be decoded"):
        load_image({"path": "in/zip.png", "bytes": buffer.getvalue()[:100]})
    with pytest.raises(MRADInputError, match="in-memory image bytes is empty"):
        load_image(b"")


def test_load_pair_returns_the_binary_mask_at_the_image_size():
    processor = MRADImageProcessor(image_size=56)
    mask = np.zeros((30, 40), np.uint8)
    mask[3:9, 4:20] = 2
    image, binary = processor.load_pair(np.zeros((30, 40, 3), np.uint8), mask)
    assert image.size == (40, 30) and binary.dtype == bool and binary.sum() == 6 * 16
    assert processor.load_pair(np.zeros((30, 40, 3), np.uint8), None)[1] is None
    # a decoded pair goes through the processor unchanged: same tensors as the raw pair
    direct = processor(np.zeros((30, 40, 3), np.uint8), masks=mask)
    again = processor(image, masks=binary)
    assert torch.equal(direct["pixel_values"], again["pixel_values"]) and torch.equal(direct["masks"], again["masks"])
