# SPDX-License-Identifier: Apache-2.0
"""Preprocessing equals the reference transforms; every kind of bad input gets a clear error or is handled."""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mrad_hf import MRADImageProcessor, MRADInputError, load_image
from mrad_hf.models.mrad.configuration_mrad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mrad_hf.models.mrad.image_processing_mrad import preprocess_mask


def preprocess_image(image, size: int) -> torch.Tensor:
    """One image through `MRADImageProcessor` at `size` x `size` -> (3, S, S), with no minimum side."""
    return MRADImageProcessor(image_size=size, min_image_side=1)(image)["pixel_values"][0]


def _expected_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The reference: Resize((S, S), BICUBIC) on the PIL image, convert('RGB'), ToTensor, Normalize."""
    array = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    return (
        (array - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    ).transpose(2, 0, 1)


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


# ---------------------------------------------------------------------- built on CLIP's processors
def _reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An independent re-statement of the reference transform in torch: PIL `resize((S, S), BICUBIC)` in the image's
    own mode, `convert("RGB")`, `ToTensor` (/255 in float32), `Normalize` (float32)."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def _random_image(mode: str, height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "LA":
        image = Image.fromarray(array[..., 0], "L").convert("LA")
        image.putalpha(Image.fromarray(array[..., 1], "L"))
        return image
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
@pytest.mark.parametrize("height, width", [(518, 518), (1024, 1024), (1000, 1500), (37, 611), (15, 14)])
def test_pixels_are_bit_identical_to_the_reference_stretch(mode, height, width):
    """Every size (down, up, non-square, the identity) and mode, at the reference 518: equal to the last bit."""
    image = _random_image(mode, height, width, seed=height * 7 + width)
    pixels = MRADImageProcessor()(image)["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 3, 518, 518)
    assert torch.equal(pixels[0], _reference_pixels(image, 518))


def test_processor_is_clips_pil_processor_with_the_reference_settings():
    """MRAD adds masks, decoding and post-processing; the pixels come from CLIP's own processor, as configured here."""
    from transformers import CLIPImageProcessorPil

    processor = MRADImageProcessor()
    assert isinstance(processor, CLIPImageProcessorPil) and processor.backend == "pil"
    clip = CLIPImageProcessorPil(
        size={"height": 518, "width": 518}, do_center_crop=False, resample=Image.Resampling.BICUBIC
    )
    image = _random_image("RGB", 300, 451, seed=3)
    assert torch.equal(processor(image)["pixel_values"], clip(image, return_tensors="pt")["pixel_values"])
    # settings off the fast path (a centre crop) are CLIP's own steps, rescale and normalize included: the same bits
    cropped = dict(do_center_crop=True, crop_size={"height": 480, "width": 500})
    clip_cropped = CLIPImageProcessorPil(
        size={"height": 518, "width": 518}, resample=Image.Resampling.BICUBIC, **cropped
    )
    expected = clip_cropped(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(MRADImageProcessor(**cropped)(image)["pixel_values"], expected) and expected.shape[-2:] == (
        480,
        500,
    )
    saved = processor.to_dict()
    assert (
        saved["size"] == {"height": 518, "width": 518} and saved["do_center_crop"] is False and saved["resample"] == 3
    )
    assert saved["image_processor_type"] == "MRADImageProcessor" and saved["min_image_side"] == 14


def test_folders_saved_with_the_old_image_size_key_still_load(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_processor_type": "MRADImageProcessor", "image_size": 84, "image_mean": [0.5, 0.5, 0.5], '
        '"image_std": [0.5, 0.5, 0.5], "mask_threshold": 0.4, "exif_transpose": true, "min_image_side": 7}'
    )
    loaded = MRADImageProcessor.from_pretrained(tmp_path)
    assert loaded.image_size == 84 and loaded.size == {"height": 84, "width": 84} and loaded.min_image_side == 7
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.mask_threshold == 0.4
    assert loaded(np.zeros((10, 10, 3), np.uint8))["pixel_values"].shape == (1, 3, 84, 84)


def test_auto_image_processor_picks_the_registered_backends(tmp_path):
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    MRADImageProcessor(image_size=56).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MRADImageProcessor  # the bit-exact default
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is MRADImageProcessor
    if not is_torchvision_available():
        from mrad_hf import MRADImageProcessorFast

        with pytest.raises(ImportError, match="pip install torchvision"):
            MRADImageProcessorFast()


def test_fast_processor_is_close_to_the_reference_when_torchvision_imports():
    """Runs only where torchvision imports (PyPI's does not beside the torch 2.13 CPU wheel used here)."""
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor

    from mrad_hf import MRADImageProcessorFast

    fast = MRADImageProcessorFast()
    assert isinstance(fast, CLIPImageProcessor) and fast.backend == "torchvision"
    images = [_random_image("RGB", 700, 900, seed=5), _random_image("L", 300, 200, seed=6)]
    masks = [None, np.ones((300, 200), bool)]
    out, reference = fast(images, masks=masks), MRADImageProcessor()(images, masks=masks)
    assert out["pixel_values"].shape == reference["pixel_values"].shape
    assert (out["pixel_values"] - reference["pixel_values"]).abs().mean() < 0.02
    assert torch.equal(out["masks"], reference["masks"]) and torch.equal(
        out["original_sizes"], reference["original_sizes"]
    )


@pytest.mark.parametrize(
    "extension, save_as", [(".webp", "WEBP"), (".gif", "GIF"), (".jfif", "JPEG"), (".tiff", "TIFF"), (".ppm", "PPM")]
)
def test_formats_beyond_png_and_jpeg_decode(tmp_path, extension, save_as):
    from mrad_hf import SUPPORTED_IMAGE_EXTENSIONS

    assert extension in SUPPORTED_IMAGE_EXTENSIONS
    array = np.random.default_rng(4).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    path = tmp_path / f"image{extension}"
    Image.fromarray(array).save(path, save_as, **({"lossless": True} if save_as == "WEBP" else {}))
    decoded = load_image(path)
    assert decoded.mode == "RGB" and decoded.size == (32, 24)
    if save_as in ("WEBP", "TIFF", "PPM"):  # lossless: the very pixels
        np.testing.assert_array_equal(np.asarray(decoded), array)
    assert MRADImageProcessor(image_size=28)(path)["pixel_values"].shape == (1, 3, 28, 28)


@pytest.mark.parametrize("name, save_as", [("anim.gif", "GIF"), ("anim.png", "PNG"), ("pages.tiff", "TIFF")])
def test_multi_frame_images_give_their_first_frame_with_one_warning(tmp_path, name, save_as):
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / name, save_as, save_all=True, append_images=frames[1:])  # PNG: APNG
    path = tmp_path / name
    for source, shown in ((path, f"'{path}'"), (path.read_bytes(), "in-memory image bytes")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_image(source).getpixel((5, 5)) == (255, 0, 0)
        expected = f"Image {shown}: scoring frame 1 of 3, the rest ignored (split the file to score those)."
        assert [str(w.message) for w in caught] == [expected]
    frames[0].save(tmp_path / f"one-{name}", save_as)  # a single frame: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / f"one-{name}").getpixel((5, 5)) == (255, 0, 0)


def test_supported_extensions_are_only_formats_this_pil_decodes():
    from mrad_hf import SUPPORTED_IMAGE_EXTENSIONS

    Image.init()
    registered = Image.registered_extensions()
    assert all(registered[extension] in Image.OPEN for extension in SUPPORTED_IMAGE_EXTENSIONS)
    assert not {".eps", ".ps", ".pdf", ".wmf", ".h5"} & set(SUPPORTED_IMAGE_EXTENSIONS)  # not photographs, or run code


# ---------------------------------------------------------------------- post_process_anomaly_detection
def test_post_process_resizes_maps_and_thresholds():
    processor = MRADImageProcessor(image_size=28)
    maps = torch.linspace(0, 1, 2 * 28 * 28).reshape(2, 28, 28)
    outputs = {"anomaly_map": maps, "anomaly_score": torch.tensor([0.2, 0.8])}
    plain = processor.post_process_anomaly_detection(outputs, target_sizes=[(28, 28), (50, 30)])
    assert [r["score"] for r in plain] == pytest.approx([0.2, 0.8])
    assert torch.equal(plain[0]["anomaly_map"], maps[0])  # same size: untouched
    expected = F.interpolate(maps[1][None, None], size=(50, 30), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(plain[1]["anomaly_map"], expected)
    assert "label" not in plain[0] and "mask" not in plain[0]
    decided = processor.post_process_anomaly_detection(outputs, target_sizes=[(28, 28), (50, 30)], threshold=0.5)
    assert [r["label"] for r in decided] == ["normal", "anomaly"] and [r["is_anomalous"] for r in decided] == [
        False,
        True,
    ]
    assert torch.equal(decided[1]["mask"], expected > 0.5) and decided[1]["mask"].dtype == torch.bool
    pixel = processor.post_process_anomaly_detection(outputs, threshold=0.5, pixel_threshold=0.9)
    assert torch.equal(pixel[0]["mask"], maps[0] > 0.9) and pixel[0]["anomaly_map"].shape == (28, 28)
    with pytest.raises(ValueError, match="finite"):
        processor.post_process_anomaly_detection(outputs, threshold=float("nan"))
    with pytest.raises(ValueError, match="2 anomaly maps but 1 target sizes"):
        processor.post_process_anomaly_detection(outputs, target_sizes=[(5, 5)])
