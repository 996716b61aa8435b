# SPDX-License-Identifier: Apache-2.0
"""MRAD's image processor: CLIP's processors plus MRAD's additions (paper Sec. 4.1; reference `utils/transforms.py`).

Pixels are CLIP's: `MRADImageProcessor` is `CLIPImageProcessorPil` set to the reference transform (PIL bicubic
stretch to 518 x 518, no crop, /255, OpenAI mean/std), bit for bit; `MRADImageProcessorFast` is the optional
torchvision backend (close to, not identical with, PIL's bicubic; used only with `backend="torchvision"`).
MRAD adds one decoder for every entry point (`load_image`, by content; formats in `SUPPORTED_IMAGE_EXTENSIONS`, first
frame of GIF/APNG/TIFF (warned); EXIF orientation; palette, 1-bit, CMYK, 16/32-bit (by nominal range, where
transformers' loader clips) and float images converted; alpha dropped after the resize as in the reference, where CLIP
composites on white; URLs via `transformers.image_utils.load_image`; PIL's bomb guard, its warning band refused too)
with one error, `MRADInputError`, naming the input and the fix; images under `min_image_side` are refused; masks
(non-zero = anomalous, PIL bilinear resize, > `mask_threshold`, the reference's ground truth);
`post_process_anomaly_detection` (maps at the original sizes, scores, masks, labels).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import image_utils  # its load_image fetches URLs (looked up per call, as tests patch it)
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_torchvision_available

from .configuration_mrad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["SUPPORTED_IMAGE_EXTENSIONS", "MRADImageProcessor", "MRADImageProcessorFast", "MRADInputError"]
__all__ += ["load_image", "load_mask", "preprocess_mask"]

ImageLike = str | os.PathLike | bytes | dict | Image.Image | np.ndarray | torch.Tensor
_NUMERIC_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # masks: compared raw; images: scaled to 8 bits
_EXTENSIONS = (  # the raster formats MRAD accepts where this PIL build decodes them
    ".png .apng .jpg .jpeg .jpe .jfif .bmp .dib .tif .tiff .webp .gif .ppm .pgm .pbm .pnm .tga .jp2 .j2k .jpx .qoi"
)
Image.init()
#: Extensions of the raster formats this PIL build decodes; folder loaders and the CLI look for these.
SUPPORTED_IMAGE_EXTENSIONS = tuple(ext for ext in _EXTENSIONS.split() if Image.EXTENSION.get(ext) in Image.OPEN)


class MRADInputError(ValueError):
    """An input image or mask that MRAD cannot use; the message names the input and the fix."""


def _describe(source: Any) -> str:
    """How a message names an input: its path in quotes, else what it is."""
    if isinstance(source, (str, os.PathLike)) or (isinstance(source, dict) and source.get("path")):
        return f"'{source['path'] if isinstance(source, dict) else os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, dict)):
        return "in-memory image bytes"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"array of shape {tuple(source.shape)} and dtype {source.dtype}"
    return f"object of type {type(source).__name__}"


def _one_line(error: BaseException) -> str:
    """`Type: message` of a decoder error on one line (messages are printed as one-line CLI errors)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Scale a numeric array to uint8 by its nominal range; reject NaN/inf and values outside any known range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MRADInputError(f"{name} contains NaN or infinite values; clean the array (e.g. np.nan_to_num).")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 255.0:
            raise MRADInputError(
                f"{name} holds floats in [{low:g}, {high:g}]; MRAD expects floats in [0, 1] or [0, 255]. "
                "Rescale the image to one of these ranges first."
            )
        return np.round(array * (255.0 if high <= 1.0 else 1.0)).astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise MRADInputError(f"{name} has unsupported dtype {array.dtype}; pass uint8, uint16 or float pixels.")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise MRADInputError(f"{name} has negative pixel values ({low}); pass an unsigned image.")
    if array.dtype.itemsize == 1:  # int8 >= 0 or uint8
        return array.astype(np.uint8)
    if array.dtype.itemsize == 2 or high <= 65535:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    return np.round(array.astype(np.float64) / float(np.iinfo(array.dtype).max) * 255.0).astype(np.uint8)


def _to_pil(image: Image.Image | np.ndarray, name: str) -> Image.Image:
    """A PIL image or an (H, W[, C]) / (C, H, W) array in a mode that resizes as the reference's: L, RGB, RGBA, LA."""
    if isinstance(image, Image.Image):
        if image.mode in ("L", "RGB", "RGBA", "LA"):
            return image
        if image.mode not in _NUMERIC_MODES:
            alpha = image.mode == "PA" or (image.mode == "P" and "transparency" in image.info)
            return image.convert("L" if image.mode == "1" else "RGBA" if alpha else "RGB")
        image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # CHW -> HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise MRADInputError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image array, got {image.shape}.")
    array = _array_to_uint8(np.ascontiguousarray(image), name)
    return Image.fromarray(array, mode="L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[-1]])


def _decode(source: Any, name: str, exif_transpose: bool, timeout: float | None = None) -> Image.Image:
    """The source as a PIL image (EXIF orientation applied, mode as stored); any failure is an MRADInputError."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _to_pil(source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source, name)
    image = source if isinstance(source, Image.Image) else _read(source, name, timeout)
    try:
        return image if not exif_transpose or image.getexif().get(0x0112, 1) == 1 else ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - a corrupt EXIF block must not crash a batch
        message = f"Image {name} has a corrupt EXIF block ({_one_line(error)}); re-export it without EXIF."
        raise MRADInputError(message) from error


def _read(source: Any, name: str, timeout: float | None) -> Image.Image:
    """A path, URL, bytes or datasets value, decoded by content under PIL's bomb guard; failures name the input."""
    url = isinstance(source, str) and source.startswith(("http://", "https://"))
    path, data = (Path(source), None) if isinstance(source, (str, os.PathLike)) else (Path("<bytes>"), source)
    if isinstance(source, dict) and ("path" in source or "bytes" in source):  # datasets' undecoded Image value
        path, data = Path(source.get("path") or "<bytes>"), source.get("bytes")
        if data is None and not source.get("path"):
            raise MRADInputError(f"Image {name} has neither a path nor bytes.")
    elif not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        fix = "Pass a file path, a PIL image or an (H, W[, C]) array."
        raise MRADInputError(f"Unsupported image input: {name}. {fix}")
    if not url and data is None and path.is_dir():
        fix = "Pass the files inside it (the CLI accepts folders)."
        raise MRADInputError(f"Image path {name} is a folder, not an image file. {fix}")
    if not url and data is None and not path.is_file():
        raise MRADInputError(f"Image file {name} does not exist (or is not a regular file). Check the path.")
    if not url and (len(data) if data is not None else path.stat().st_size) == 0:
        kind = "Image file" if data is None else "Image"
        raise MRADInputError(f"{kind} {name} is empty (0 bytes). Re-export or remove it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns at 1x to 2x its limit
            if url:
                return image_utils.load_image(source, timeout=timeout)
            with Image.open(path if data is None else io.BytesIO(data)) as opened:
                opened.load()
                image, frames = opened.copy(), getattr(opened, "n_frames", 1)
    except Exception as error:  # noqa: BLE001 - decoders of untrusted bytes raise anything (struct.error, ...)
        if url:  # network errors, HTTP error pages, undecodable bodies
            message = f"Image URL {name} could not be fetched and decoded ({_one_line(error)}). Check the address"
            message += " (and timeout=), or download the file and pass its path."
        elif isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            message = f"Image file {name} is too large to decode safely ({error}). If you trust it, raise "
            message += "PIL.Image.MAX_IMAGE_PIXELS, or downscale the file first."
        elif isinstance(error, UnidentifiedImageError):
            message = f"Image file {name} is not a readable image (unknown or corrupt format). Re-export it as"
            message += " PNG or JPEG."
        else:
            message = f"Image file {name} could not be decoded ({_one_line(error)}); it is probably truncated or "
            message += "corrupt. Re-export it as PNG or JPEG, or remove it."
        raise MRADInputError(message) from error
    if frames > 1:  # animated GIF / APNG, multi-page TIFF: PIL decodes (and MRAD scores) the first frame only
        warnings.warn(f"Image {name}: scoring frame 1 of {frames}, the rest ignored (split the file to score those).")
    return image


def load_image(source: ImageLike, *, exif_transpose: bool = True, timeout: float | None = None) -> Image.Image:
    """The one decoder: a path / URL / bytes / datasets value / PIL image / array as L, RGB, RGBA or LA; raises
    `MRADInputError` for unreadable, empty, truncated or bomb-sized files, folders, NaN arrays, unsupported layouts
    and URLs that cannot be fetched within `timeout` seconds."""
    name = _describe(source)
    image = _decode(source, name, exif_transpose, timeout)
    try:
        return _to_pil(image, name)
    except MRADInputError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a decoded image whose pixel data is inconsistent
        message = f"Image {name} could not be converted to RGB ({_one_line(error)}). Save it as 8-bit RGB."
        raise MRADInputError(message) from error


def load_mask(source: ImageLike, *, exif_transpose: bool = True) -> np.ndarray:
    """A ground-truth mask as an (H, W) bool array, True where non-zero (the reference's `> 0`): arrays (H, W),
    (1, H, W), (H, W, 1) and single-channel numeric modes (1, L, I, I;16, F) on their raw values, other modes
    through `convert("L")` as the reference does."""
    name = f"Mask {_describe(source)}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    else:
        image = _decode(source, f"{_describe(source)} (a mask)", exif_transpose)
        try:
            array = np.asarray(image if image.mode in ("1", "L", *_NUMERIC_MODES) else image.convert("L"))
        except Exception as error:  # noqa: BLE001
            message = f"{name} could not be converted to grey levels ({_one_line(error)}). Save it as an 8-bit PNG."
            raise MRADInputError(message) from error
    if array.ndim != 2:
        raise MRADInputError(f"{name}: expected a single-channel (H, W) mask, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise MRADInputError(f"{name} contains NaN or infinite values; clean it (0 = normal, > 0 = anomalous).")
    return array > 0


def preprocess_mask(mask: ImageLike | None, size, threshold=0.5, *, exif_transpose=True) -> torch.Tensor:
    """Reference mask preprocessing -> (S, S) (or `size=(H, W)`) float tensor of 0/1; `None` (a good image): zeros."""
    height, width = (size, size) if isinstance(size, int) else size
    if mask is None:
        return torch.zeros(height, width)
    binary = Image.fromarray(load_mask(mask, exif_transpose=exif_transpose).astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((resized > threshold).astype(np.float32))


class MRADImageProcessorKwargs(ImagesKwargs, total=False):
    """CLIP's image kwargs plus MRAD's: mask binarisation, EXIF handling and the smallest accepted image side."""

    mask_threshold: float
    exif_transpose: bool
    min_image_side: int


class _MRADProcessing:
    """What MRAD adds to a CLIP image processor backend (mixed in before CLIP's PIL or torchvision processor).

    Besides CLIP's arguments: `image_size` (shorthand for `size={"height": S, "width": S}`, the key of folders saved
    before; default 518), `mask_threshold` (0.5), `exif_transpose` (True), `min_image_side` (14, one ViT-L/14 patch).
    Returns a `BatchFeature`: `pixel_values` (B, 3, S, S), `original_sizes` (B, 2) as (height, width) and, with
    `masks` (one per image, `None` for a good image), `masks` (B, S, S) of 0/1. CLIP's resample: bicubic.
    """

    valid_kwargs = MRADImageProcessorKwargs
    image_mean, image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    size = crop_size = {"height": 518, "width": 518}
    default_to_square = True
    do_center_crop = False  # the reference's CenterCrop(518) after a 518 x 518 stretch is a no-op
    mask_threshold, exif_transpose, min_image_side = 0.5, True, 14

    def __init__(self, image_size: int | None = None, **kwargs):
        if image_size is not None:
            kwargs["size"] = kwargs["crop_size"] = {"height": int(image_size), "width": int(image_size)}
        super().__init__(**kwargs)

    @property
    def image_size(self) -> int:
        """Side of the square network input (`size["height"]`)."""
        return int(self.size["height"])

    @classmethod
    def from_config(cls, config, **kwargs):
        """The processor that matches an `MRADConfig` (size, statistics, mask threshold, smallest image)."""
        settings = dict(image_size=config.image_size, image_mean=config.image_mean, image_std=config.image_std)
        settings.update(mask_threshold=config.mask_threshold, min_image_side=config.patch_size)
        return cls(**{**settings, **kwargs})

    def load(self, source: ImageLike, *, timeout: float | None = None) -> Image.Image:
        """Decode one input with MRAD's decoder and refuse images smaller than `min_image_side`."""
        image = load_image(source, exif_transpose=self.exif_transpose, timeout=timeout)
        if min(image.size) < self.min_image_side:
            raise MRADInputError(
                f"Image {_describe(source)} is {image.width}x{image.height} pixels; MRAD needs at least "
                f"{self.min_image_side}x{self.min_image_side} (one patch). Upscale it yourself if this is intended."
            )
        return image

    def load_pair(self, image: ImageLike, mask: ImageLike | None = None) -> tuple[Image.Image, np.ndarray | None]:
        """Decode and check one image and its mask (`None` for a good image; else an (H, W) bool array of its size)."""
        decoded = self.load(image)
        binary = None if mask is None else load_mask(mask, exif_transpose=self.exif_transpose)
        if binary is not None and binary.shape != (decoded.height, decoded.width):
            raise MRADInputError(
                f"Mask {_describe(mask)} is {binary.shape[1]}x{binary.shape[0]} but its image {_describe(image)} is "
                f"{decoded.width}x{decoded.height}; masks must have the image's size. Fix or remove the mask."
            )
        return decoded, binary

    def preprocess(self, images, masks=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (paths, URLs, PIL images, arrays, bytes, datasets values; one or a list) and optional masks."""
        return super().preprocess(images, masks, return_tensors=return_tensors, **kwargs)

    def _preprocess_image_like_inputs(self, images, masks=None, *, return_tensors=None, **kwargs) -> BatchFeature:
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        masks = masks if masks is None else [masks] if single else list(masks)
        if masks is not None and len(masks) != len(images):
            raise MRADInputError(f"Got {len(images)} images but {len(masks)} masks; pass one (or None) per image.")
        pairs = [self.load_pair(image, None if masks is None else masks[index]) for index, image in enumerate(images)]
        size, resample = kwargs["size"], kwargs["resample"]
        # alpha: resized with it, then dropped (the reference's order); CLIP's resize of the result is then a no-op
        decoded = [
            image.resize((size.width, size.height), resample).convert("RGB") if image.mode in ("RGBA", "LA") else image
            for image, _ in pairs
        ]
        pixels = self._pixels(decoded, kwargs)
        data = {"pixel_values": torch.stack(pixels) if isinstance(pixels[0], torch.Tensor) else np.stack(pixels)}
        data["original_sizes"] = np.array([(image.height, image.width) for image, _ in pairs], dtype=np.int64)
        if masks is not None:
            threshold = kwargs.get("mask_threshold", self.mask_threshold)
            resized = [preprocess_mask(mask, (size.height, size.width), threshold).numpy() for _, mask in pairs]
            data["masks"] = np.stack(resized)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pixels(self, images: list[Image.Image], kwargs: dict[str, Any]) -> list:
        """CLIP's steps on decoded PIL images: `_prepare_image_like_inputs` then `_preprocess`."""
        prepared = self._prepare_image_like_inputs(images, **kwargs)
        return self._preprocess(prepared, **{**kwargs, "return_tensors": None})["pixel_values"]

    def post_process_anomaly_detection(self, outputs, target_sizes=None, threshold=None, pixel_threshold=None):
        """Per image of `outputs` (an `MRADOutput`, or a dict with `anomaly_map` (B, S, S) and `anomaly_score` (B,)):
        a dict with `score` (float); `anomaly_map` (float tensor, resized bilinearly to `target_sizes[i]` = (height,
        width) when given); with `threshold`, `is_anomalous` and `label` ("anomaly" | "normal"); with a pixel
        threshold (`pixel_threshold`, defaulting to `threshold`), `mask` (bool, map > it).
        """
        for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None and not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        pixel_threshold = threshold if pixel_threshold is None else pixel_threshold
        maps, scores = outputs["anomaly_map"].detach().float(), outputs["anomaly_score"].detach().float().reshape(-1)
        sizes = None if target_sizes is None else [tuple(int(v) for v in size) for size in target_sizes]
        if sizes is not None and len(sizes) != maps.shape[0]:
            count = f"Got {maps.shape[0]} anomaly maps but {len(sizes)} target sizes"
            raise ValueError(f"{count}; pass one (height, width) per image.")
        results = []
        for index, anomaly_map in enumerate(maps.reshape(maps.shape[0], *maps.shape[-2:])):
            target = tuple(anomaly_map.shape) if sizes is None else sizes[index]
            if target != tuple(anomaly_map.shape):
                resized = F.interpolate(anomaly_map[None, None], target, mode="bilinear", align_corners=False)
                anomaly_map = resized[0, 0]
            result = {"score": float(scores[index]), "anomaly_map": anomaly_map}
            if threshold is not None:
                result["is_anomalous"] = result["score"] > threshold
                result["label"] = "anomaly" if result["is_anomalous"] else "normal"
            if pixel_threshold is not None:
                result["mask"] = anomaly_map > pixel_threshold
            results.append(result)
        return results

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["image_processor_type"] = "MRADImageProcessor"  # backend-neutral, as CLIP's: the loader picks one
        return output


class MRADImageProcessor(_MRADProcessing, CLIPImageProcessorPil):
    """MRAD's image processor on CLIP's PIL backend: the reference preprocessing, bit for bit (see the module doc)."""

    def _pixels(self, images: list[Image.Image], kwargs: dict[str, Any]) -> list:
        """For the default steps, CLIP's PIL path without its round trips (PIL -> numpy -> PIL, float64 copies): the
        PIL resize, then one float32 pass of /255, -mean, /std, the same values to the last bit (tests); other
        settings go CLIP's way."""
        flags = all(kwargs.get(step) for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
        plain = not (kwargs.get("do_center_crop") or kwargs.get("do_pad")) and kwargs.get("device") is None
        layout = kwargs.get("data_format") in (None, "channels_first") and kwargs.get("input_data_format") is None
        if not (flags and plain and layout) or abs(kwargs["rescale_factor"] * 255.0 - 1.0) > 1e-12:
            return super()._pixels(images, kwargs)
        size, resample = kwargs["size"], kwargs["resample"]
        mean, std = (np.asarray(kwargs[key], np.float32).reshape(-1, 1, 1) for key in ("image_mean", "image_std"))
        pixels = []
        for image in images:
            image = image if image.mode == "RGB" else image.convert("RGB")  # CLIP's do_convert_rgb
            image = image.resize((size.width, size.height), resample)  # a copy if already that size
            array = np.array(np.asarray(image).transpose(2, 0, 1), dtype=np.float32, order="C")  # (3, H, W)
            array /= np.float32(255.0)  # == float32(x * (1/255) in float64) for every uint8 x
            array -= mean
            array /= std
            pixels.append(array)
        return pixels


class MRADImageProcessorFast(_MRADProcessing, CLIPImageProcessor):
    """MRAD's image processor on CLIP's torchvision backend (optional; close to, not identical with, the PIL one)."""

    def __init__(self, image_size: int | None = None, **kwargs):
        if not is_torchvision_available():
            raise ImportError(
                "MRADImageProcessorFast needs torchvision (pip install torchvision); MRADImageProcessor "
                "(the PIL backend, bit-exact with the reference) needs nothing more."
            )
        super().__init__(image_size=image_size, **kwargs)
