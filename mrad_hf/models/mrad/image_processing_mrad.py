# SPDX-License-Identifier: Apache-2.0
"""The one preprocessing of images and ground-truth masks for MRAD (reference: `utils/transforms.py`, `utils/dataset.py`).

Images: PIL `resize((S, S), BICUBIC)` in the image's own mode (this **stretches**, no aspect-preserving
crop; PIL always antialiases), then RGB conversion, /255, OpenAI CLIP mean/std. This is bit-for-bit what
the reference's torchvision transforms do on a PIL image.

Masks: any non-zero pixel is anomalous (`mask.convert("L") > 0`), the 0/255 image is resized bilinearly to
S x S in PIL, divided by 255 and thresholded at `mask_threshold` (0.5). Single-channel 16-bit, 32-bit and
float masks are binarised on their raw values (`> 0`), so a 16-bit mask holding defect id 1 stays anomalous
(what `convert("L")` gives too; for float masks the reference's `convert("L")` would truncate 0.7 to 0, we
do not). A mask must have its image's size; NaN masks are rejected.

Inputs that the reference never sees are normalised first and documented here, each a deliberate choice
(README, "Bad input"):

* EXIF orientation is applied (`exif_transpose=True`), as `transformers.image_utils.load_image` does;
  benchmark images carry no orientation tag, so this never changes a benchmark result.
* palette ("P"), 1-bit, CMYK/YCbCr/LAB/HSV images are converted to RGB (or L / RGBA) before resizing;
* 16-bit and 32-bit integer images are scaled to 8 bits by their nominal range; float images in [0, 1]
  are scaled by 255; NaN or infinite values are rejected;
* images smaller than `min_image_side` (default: one 14-pixel patch) are rejected;
* PIL's decompression-bomb guard is kept and reported with the file name and how to lift it;
* files are decoded by content, not by extension; anything that fails to decode (random bytes, truncated
  or corrupt files, a folder or a missing path) raises `MRADInputError`, whatever exception the decoder threw.

Every failure raises `MRADInputError` naming the file (or the input's position) and what to do.
`docs/reliability.md` lists each kind of bad input, what the user sees and the test that checks it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_mrad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["MRADImageProcessor", "MRADInputError", "load_image", "load_mask", "to_pil_image", "preprocess_image", "preprocess_mask"]

ImageLike = str | os.PathLike | bytes | dict | Image.Image | np.ndarray | torch.Tensor


class MRADInputError(ValueError):
    """An input image or mask that MRAD cannot use; the message names the input and the fix."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, dict) and source.get("path"):
        return f"'{source['path']}'"
    if isinstance(source, (bytes, bytearray, dict)):
        return "in-memory image bytes"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"array of shape {tuple(source.shape)} and dtype {source.dtype}"
    return f"object of type {type(source).__name__}"


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Scale a numeric array to uint8 by its nominal range; reject NaN/inf and values outside any known range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MRADInputError(f"{name} contains NaN or infinite values; clean the array (e.g. np.nan_to_num) before scoring it.")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(array * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(array).astype(np.uint8)
        raise MRADInputError(
            f"{name} holds floats in [{low:g}, {high:g}]; MRAD expects floats in [0, 1] or [0, 255]. "
            "Rescale the image to one of these ranges first."
        )
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise MRADInputError(f"{name} has negative pixel values ({low}); pass an unsigned image.")
        if high <= 255 and array.dtype.itemsize == 1:
            return array.astype(np.uint8)
        if array.dtype.itemsize <= 2 or high <= 65535:
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        return np.round(array.astype(np.float64) / float(np.iinfo(array.dtype).max) * 255.0).astype(np.uint8)
    raise MRADInputError(f"{name} has unsupported dtype {array.dtype}; pass uint8, uint16 or float pixels.")


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise MRADInputError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {array.shape}.")
    array = _array_to_uint8(np.ascontiguousarray(array), name)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[-1]]
    return Image.fromarray(array, mode=mode)


def _normalise_mode(image: Image.Image, name: str) -> Image.Image:
    """Bring any PIL mode to one that resizes like the reference's inputs: L, RGB, RGBA or LA."""
    mode = image.mode
    if mode in ("L", "RGB", "RGBA", "LA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_pil(np.asarray(image), name)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise MRADInputError(f"{name}: cannot convert PIL mode {mode!r} to RGB ({error}). Save the image as 8-bit RGB.") from error


def _decode_file(path: Path, name: str, data: bytes | None = None) -> Image.Image:
    """Fully decode one image file (or its bytes); any decoder failure becomes an MRADInputError naming it."""
    if data is None:
        if path.is_dir():
            raise MRADInputError(f"Image path {name} is a folder, not an image file. Pass the files inside it (the CLI accepts folders).")
        if not path.is_file():
            raise MRADInputError(f"Image file {name} does not exist (or is not a regular file). Check the path.")
        if path.stat().st_size == 0:
            raise MRADInputError(f"Image file {name} is empty (0 bytes). Re-export or remove it.")
    elif len(data) == 0:
        raise MRADInputError(f"Image {name} is empty (0 bytes). Re-export or remove it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as opened:
                opened.load()
                return opened.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MRADInputError(
            f"Image file {name} is too large to decode safely ({error}). If you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS, or downscale the file first."
        ) from error
    except UnidentifiedImageError as error:
        raise MRADInputError(f"Image file {name} is not a readable image (unknown or corrupt format). Re-export it as PNG or JPEG.") from error
    except Exception as error:  # noqa: BLE001 - decoders of untrusted bytes raise anything (struct.error, IndexError, ...)
        raise MRADInputError(
            f"Image file {name} could not be decoded ({_one_line(error)}); it is probably truncated or corrupt. "
            "Re-export it as PNG or JPEG, or remove it."
        ) from error


def _decode(source: Any, name: str) -> Image.Image:
    """The source as a PIL image, before EXIF and mode handling."""
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(Path(source), name)
    if isinstance(source, dict) and ("path" in source or "bytes" in source):  # datasets' undecoded Image value
        if source.get("bytes") is not None:
            return _decode_file(Path(source.get("path") or "<bytes>"), name, data=source["bytes"])
        if source.get("path"):
            return _decode_file(Path(source["path"]), name)
        raise MRADInputError(f"Image {name} has neither a path nor bytes.")
    if isinstance(source, (bytes, bytearray)):
        return _decode_file(Path("<bytes>"), name, data=bytes(source))
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, torch.Tensor):
        return _array_to_pil(source.detach().cpu().numpy(), name)
    if isinstance(source, np.ndarray):
        return _array_to_pil(source, name)
    raise MRADInputError(f"Unsupported image input: {name}. Pass a file path, a PIL image or an (H, W[, C]) array.")


def _one_line(error: BaseException) -> str:
    """`Type: message` of a decoder error on one line (messages are printed as one-line CLI errors)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def _exif_transpose(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - a corrupt EXIF block must not crash a batch
        raise MRADInputError(f"Image {name} has a corrupt EXIF block ({_one_line(error)}); re-export it without EXIF.") from error


def load_image(source: ImageLike, *, exif_transpose: bool = True) -> Image.Image:
    """Open a path / bytes / PIL image / array, fully decoded, in a mode MRAD can resize (L, RGB, RGBA or LA).

    Raises:
        MRADInputError: unreadable, empty, truncated or bomb-sized files; folders; NaN arrays; unsupported layouts.
    """
    name = _describe(source)
    image = _decode(source, name)
    if exif_transpose:
        image = _exif_transpose(image, name)
    try:
        return _normalise_mode(image, name)
    except MRADInputError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a decoded image whose pixel data is inconsistent
        raise MRADInputError(f"Image {name} could not be converted to RGB ({_one_line(error)}). Save it as 8-bit RGB.") from error


def load_mask(source: ImageLike, *, exif_transpose: bool = True) -> np.ndarray:
    """A ground-truth mask as an (H, W) bool array: True where the mask is non-zero (the reference's `> 0`).

    Files and PIL images: single-channel numeric modes (L, 1, I, I;16, F) are compared on their raw values,
    any other mode through `convert("L")` as the reference does. Arrays: (H, W), (1, H, W) or (H, W, 1), `> 0`.
    """
    name = f"Mask {_describe(source)}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    else:
        image = _decode(source, f"{_describe(source)} (a mask)")
        if exif_transpose:
            image = _exif_transpose(image, name)
        try:
            array = np.asarray(image if image.mode in _RAW_MASK_MODES else image.convert("L"))
        except Exception as error:  # noqa: BLE001
            raise MRADInputError(f"{name} could not be converted to grey levels ({_one_line(error)}). Save it as an 8-bit PNG.") from error
    if array.ndim != 2:
        raise MRADInputError(f"{name}: expected a single-channel (H, W) mask, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise MRADInputError(f"{name} contains NaN or infinite values; clean it (0 = normal, > 0 = anomalous).")
    return array > 0


_RAW_MASK_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_pil_image(source: ImageLike) -> Image.Image:
    """Alias of `load_image` with default options, for callers that only need a PIL image."""
    return load_image(source)


def preprocess_image(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Reference preprocessing of one decoded image: bicubic stretch to size x size, RGB, /255, normalise -> (3, S, S)."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean_t).div(std_t)


def preprocess_mask(mask: ImageLike | None, size: int, threshold: float = 0.5, *, exif_transpose: bool = True) -> torch.Tensor:
    """Reference mask preprocessing -> (S, S) float tensor of 0/1. `None` (a good image) gives all zeros."""
    if mask is None:
        return torch.zeros(size, size)
    binary = load_mask(mask, exif_transpose=exif_transpose)
    mask_image = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(mask_image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((resized > threshold).astype(np.float32))


class MRADImageProcessor(BaseImageProcessor):
    r"""Image (and mask) processor for MRAD, with the reference's exact resize and normalisation.

    Args:
        image_size (`int`, defaults to 518): side of the square network input.
        image_mean, image_std (`list[float]`): OpenAI CLIP statistics by default.
        mask_threshold (`float`, defaults to 0.5): binarisation threshold of resized masks.
        exif_transpose (`bool`, defaults to `True`): apply EXIF orientation to files and PIL images.
        min_image_side (`int`, defaults to 14): smaller images are rejected (one ViT-L/14 patch).

    Calling it returns a `BatchFeature` with `pixel_values` (B, 3, S, S), `original_sizes` (B, 2) as
    (height, width) and, when `masks` are given, `masks` (B, S, S) of 0/1.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 518,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        mask_threshold: float = 0.5,
        exif_transpose: bool = True,
        min_image_side: int = 14,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)
        self.mask_threshold = float(mask_threshold)
        self.exif_transpose = bool(exif_transpose)
        self.min_image_side = int(min_image_side)

    @classmethod
    def from_config(cls, config) -> MRADImageProcessor:
        """The processor that matches an `MRADConfig` (size, statistics, mask threshold, smallest image)."""
        return cls(
            image_size=config.image_size,
            image_mean=config.image_mean,
            image_std=config.image_std,
            mask_threshold=config.mask_threshold,
            min_image_side=config.patch_size,
        )

    def load(self, source: ImageLike) -> Image.Image:
        """Decode one input and check its size."""
        image = load_image(source, exif_transpose=self.exif_transpose)
        if min(image.size) < self.min_image_side:
            raise MRADInputError(
                f"Image {_describe(source)} is {image.width}x{image.height} pixels; MRAD needs at least "
                f"{self.min_image_side}x{self.min_image_side} (one patch). Upscale it yourself if this is intended."
            )
        return image

    def load_pair(self, image: ImageLike, mask: ImageLike | None = None) -> tuple[Image.Image, np.ndarray | None]:
        """Decode and check one image and its mask (None for a good image): the mask must have the image's size.

        Returns the decoded image and the mask as an (H, W) bool array (or None).
        """
        decoded = self.load(image)
        if mask is None:
            return decoded, None
        binary = load_mask(mask, exif_transpose=self.exif_transpose)
        if binary.shape != (decoded.height, decoded.width):
            raise MRADInputError(
                f"Mask {_describe(mask)} is {binary.shape[1]}x{binary.shape[0]} but its image {_describe(image)} is "
                f"{decoded.width}x{decoded.height}; masks must have the image's size. Fix or remove the mask."
            )
        return decoded, binary

    def preprocess(self, images, masks=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if kwargs:
            raise TypeError(f"MRADImageProcessor got unexpected arguments: {sorted(kwargs)}")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if masks is not None:
            masks = [masks] if single else list(masks)
            if len(masks) != len(images):
                raise MRADInputError(f"Got {len(images)} images but {len(masks)} masks; pass one mask (or None) per image.")
        pixel_values, sizes, processed_masks = [], [], []
        for index, source in enumerate(images):
            image, mask = self.load_pair(source, None if masks is None else masks[index])
            sizes.append((image.height, image.width))
            pixel_values.append(preprocess_image(image, self.image_size, self.image_mean, self.image_std))
            if masks is not None:
                processed_masks.append(preprocess_mask(mask, self.image_size, self.mask_threshold))
        data = {"pixel_values": torch.stack(pixel_values), "original_sizes": torch.tensor(sizes, dtype=torch.long)}
        if masks is not None:
            data["masks"] = torch.stack(processed_masks)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, masks=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, masks=masks, return_tensors=return_tensors, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        keys = ("image_size", "image_mean", "image_std", "mask_threshold", "exif_transpose", "min_image_side")
        output = {key: getattr(self, key) for key in keys}
        output["image_processor_type"] = type(self).__name__
        if "auto_map" in self.__dict__:
            output["auto_map"] = self.auto_map
        return output

