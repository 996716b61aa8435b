# SPDX-License-Identifier: Apache-2.0
"""Synthetic-defect benchmark in the MVTec AD layout, made from real CC0 textures.

What it is for: MVTec AD, VisA and the other benchmarks of the MRAD paper (arXiv 2602.00522,
Sec. 4.1) cannot be downloaded on the machines that build and test this package. This module
writes a small stand-in with the *same folder layout* as MVTec AD, so that the loaders, the
memory-bank builder, the evaluation runner and the demo can run end to end offline, and so that
tests can make in-memory defective samples with exact masks (:func:`paste_defect`). It is not a
substitute for the real benchmarks: numbers obtained on it say nothing about the paper's.

Layout written by :func:`make_synthetic_benchmark`::

    <root>/README.txt                         provenance, licences, seed and parameters
    <root>/manifest.json                      every file with its label, defect and mask
    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect_kind>/000.png
    <root>/<category>/ground_truth/<defect_kind>/000_mask.png   (0/255, same size as the image)

Images: each sample is a random square crop of a texture, randomly flipped and rotated by a
multiple of 90 degrees, resized to ``image_size`` and colourised with a fixed per-category
two-colour ramp, so normal images differ from one another. Defects (:data:`DEFECT_KINDS`):

* ``scratch``: a thin random polyline, brightened or darkened;
* ``blob``: a colour spot with an irregular outline and a soft edge;
* ``cutpaste``: a rectangle copied from another texture or another place of the same image,
  rotated by a multiple of 90 degrees and with its brightness changed;
* ``hole``: a dark ellipse, darkest at its centre, with a lit rim.

Masks are exact: a defect changes pixels only inside its mask (outside the mask the defective
image equals the clean one bit for bit). Soft edges are cut where the change falls below 20 % of
its full strength, so masked pixels carry a significant change (apart from the odd pixel that a
pasted patch happens to reproduce, or that an 8-bit rounding leaves as it was).

Data licences: the three CC0 1.0 textures ship with the package as grayscale PNGs in
``mrad_hf/data/textures/`` (see its ``ATTRIBUTION.md``): scikit-image's ``skimage.data.brick()``
from CC0Textures "Bricks25", ``skimage.data.grass()`` from DeviantArt user linolafett "Grass-01",
``skimage.data.gravel()`` from CC0Textures "Gravel04", pixel for pixel (scikit-image is not
needed). The generated images are derived from CC0 material only and may be used without restriction; this generator is Apache-2.0.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from ..memory.files import atomic_write

__all__ = [
    "DEFECT_KINDS",
    "GENERATOR_VERSION",
    "SYNTHETIC_CATEGORIES",
    "load_texture",
    "make_synthetic_benchmark",
    "paste_defect",
    "sample_normal_image",
]

GENERATOR_VERSION = "1.0.0"

#: The packaged CC0 textures (package data, with their ATTRIBUTION.md).
_TEXTURES_DIR = Path(__file__).resolve().parent / "textures"

#: Categories, one per packaged texture.
SYNTHETIC_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")

#: Defect kinds that :func:`paste_defect` can draw.
DEFECT_KINDS: tuple[str, ...] = ("scratch", "blob", "cutpaste", "hole")

# Soft edges are kept where the change is at least this fraction of its full strength.
_SOFT_EDGE_CUTOFF = 0.2
# Attempts before giving up on a defect whose mask came out empty (e.g. a tiny image).
_MAX_ATTEMPTS = 20
_MIN_IMAGE_SIDE = 16


@dataclass(frozen=True)
class _Texture:
    """A packaged grayscale texture (``textures/<loader>.png``) and the colour ramp that tints it."""

    loader: str
    source: str
    dark: tuple[int, int, int]
    light: tuple[int, int, int]


_TEXTURES: dict[str, _Texture] = {
    "brick": _Texture(
        "brick",
        "CC0Textures 'Bricks25' (https://cc0textures.com/view.php?tex=Bricks25)",
        (62, 24, 16),
        (232, 158, 118),
    ),
    "grass": _Texture(
        "grass",
        "DeviantArt linolafett 'Grass-01' (https://www.deviantart.com/linolafett/art/Grass-01-434853879)",
        (22, 48, 12),
        (168, 224, 108),
    ),
    "gravel": _Texture(
        "gravel",
        "CC0Textures 'Gravel04' (https://cc0textures.com/view.php?tex=Gravel04)",
        (38, 34, 30),
        (226, 214, 192),
    ),
}


# --------------------------------------------------------------------------------------------
# Textures and normal samples
# --------------------------------------------------------------------------------------------


def _check_category(category: str) -> None:
    if category not in _TEXTURES:
        raise ValueError(f"Unknown synthetic category {category!r}; choose from {SYNTHETIC_CATEGORIES}.")


@functools.cache
def _colourised_texture(category: str) -> NDArray[np.uint8]:
    """The tinted texture, cached read-only."""
    with Image.open(_TEXTURES_DIR / f"{_TEXTURES[category].loader}.png") as image:
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    dark = np.asarray(_TEXTURES[category].dark, dtype=np.float64)
    light = np.asarray(_TEXTURES[category].light, dtype=np.float64)
    rgb = dark + (light - dark) * (gray[..., None] / 255.0)
    texture = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    texture.flags.writeable = False
    return texture


def load_texture(category: str) -> NDArray[np.uint8]:
    """Returns the colourised 512 x 512 texture of a synthetic category.

    Args:
        category: One of :data:`SYNTHETIC_CATEGORIES`.

    Returns:
        A new ``(512, 512, 3)`` uint8 RGB array (the packaged grayscale texture mapped onto
        the category's dark-to-light colour ramp).

    Raises:
        ValueError: For an unknown category.
    """
    _check_category(category)
    return _colourised_texture(category).copy()


def sample_normal_image(
    texture: NDArray[np.uint8], rng: np.random.Generator, image_size: int = 256
) -> NDArray[np.uint8]:
    """A random normal sample: crop, flip, rotate by k x 90 degrees, resize.

    Args:
        texture: ``(H, W, 3)`` uint8 texture, e.g. from :func:`load_texture`.
        rng: Source of randomness (the result is a deterministic function of its state).
        image_size: Side of the square output.

    Returns:
        An ``(image_size, image_size, 3)`` uint8 RGB image.
    """
    height, width = texture.shape[:2]
    side_limit = min(height, width)
    side = int(rng.integers(int(0.45 * side_limit), int(0.75 * side_limit) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = texture[top : top + side, left : left + side]
    crop = np.rot90(crop, k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: NDArray[np.float64]) -> NDArray[np.float64]:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_distance(
    shape: tuple[int, int],
    rng: np.random.Generator,
    radius_range: tuple[float, float],
    irregularity: float,
) -> tuple[NDArray[np.float64], float]:
    """Normalised distance to a random, optionally wobbly, rotated ellipse (1 on its outline).

    Returns:
        ``(distance, radius_px)`` where ``radius_px`` is the major radius in pixels.
    """
    height, width = shape
    side = min(height, width)
    cy = rng.uniform(0.22, 0.78) * height
    cx = rng.uniform(0.22, 0.78) * width
    radius = rng.uniform(*radius_range) * side
    minor = radius * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    harmonics = rng.uniform(0.0, irregularity, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    distance = np.hypot(u / radius, v / minor)
    polar = np.arctan2(v, u)
    wobble = 1.0 + sum(
        amplitude * np.cos((order + 2) * polar + phase)
        for order, (amplitude, phase) in enumerate(zip(harmonics, phases, strict=True))
    )
    return distance / wobble, radius


def _luminance(image: NDArray[np.float64]) -> NDArray[np.float64]:
    return image @ np.array([0.299, 0.587, 0.114])


def _scratch(image: NDArray[np.float64], rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """A thin polyline, brightened or darkened (whichever contrasts with the image)."""
    height, width = image.shape[:2]
    side = min(height, width)
    scale = side / 256.0
    n_points = int(rng.integers(3, 7))
    length = rng.uniform(0.25, 0.5) * side
    step = length / (n_points - 1)
    y, x = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
    heading = rng.uniform(0.0, 2 * np.pi)
    points = [(x, y)]
    for _ in range(n_points - 1):
        heading += rng.normal(0.0, 0.45)
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    line_width = max(1, round(rng.uniform(1.0, 2.6) * scale))
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=line_width, joint="curve")
    mask = np.asarray(canvas) > 0
    strength = rng.uniform(0.55, 0.8)
    brighten = _luminance(image)[mask].mean() < 128 if mask.any() else True
    changed = image + strength * (255.0 - image) if brighten else image * (1.0 - strength)
    return changed, mask


def _blob(image: NDArray[np.float64], rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """A colour spot with an irregular outline; soft edge cut at the significance level."""
    distance, _ = _ellipse_distance(image.shape[:2], rng, (0.06, 0.14), irregularity=0.08)
    alpha = 1.0 - _smoothstep(0.55, 1.25, distance)
    mask = alpha >= _SOFT_EDGE_CUTOFF
    region_mean = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
    # A target colour far from the region's mean colour (at least 110 in RGB distance).
    target = rng.uniform(0.0, 255.0, size=3)
    for _ in range(_MAX_ATTEMPTS):
        if np.linalg.norm(target - region_mean) >= 110.0:
            break
        target = rng.uniform(0.0, 255.0, size=3)
    else:
        target = np.where(region_mean > 127.5, 0.0, 255.0)
    strength = rng.uniform(0.55, 0.8)
    changed = image + (strength * alpha)[..., None] * (target - image)
    return changed, mask


def _cutpaste(
    image: NDArray[np.float64],
    rng: np.random.Generator,
    source: NDArray[np.float64] | None,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """A rectangle from ``source`` (or elsewhere in ``image``), rotated and re-lit."""
    height, width = image.shape[:2]
    side = min(height, width)
    patch_h = max(4, int(rng.uniform(0.12, 0.28) * side))
    patch_w = max(4, int(rng.uniform(0.12, 0.28) * side))
    turns = int(rng.integers(0, 4))
    if source is None:
        source, turns = image, int(rng.integers(1, 4))  # a copy of itself must be moved visibly
    src_h, src_w = (patch_w, patch_h) if turns % 2 else (patch_h, patch_w)
    src_h, src_w = min(src_h, source.shape[0]), min(src_w, source.shape[1])
    top = int(rng.integers(0, source.shape[0] - src_h + 1))
    left = int(rng.integers(0, source.shape[1] - src_w + 1))
    patch = np.rot90(source[top : top + src_h, left : left + src_w], k=turns)
    gain = rng.uniform(0.62, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.45)
    patch = patch * gain
    patch_h, patch_w = min(patch.shape[0], height), min(patch.shape[1], width)
    dest_top = int(rng.integers(0, height - patch_h + 1))
    dest_left = int(rng.integers(0, width - patch_w + 1))
    changed = image.copy()
    footprint = (slice(dest_top, dest_top + patch_h), slice(dest_left, dest_left + patch_w))
    changed[footprint] = patch[:patch_h, :patch_w]
    mask = np.zeros((height, width), dtype=bool)
    mask[footprint] = True
    return changed, mask


def _hole(image: NDArray[np.float64], rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """A dark ellipse, darkest at its centre, with a lit rim just outside its outline."""
    distance, radius = _ellipse_distance(image.shape[:2], rng, (0.05, 0.11), irregularity=0.04)
    rim_width = max(1.0, rng.uniform(1.5, 3.0) * min(image.shape[:2]) / 256.0)
    rim_outer = 1.0 + rim_width / radius
    inside = distance <= 1.0
    rim = (distance > 1.0) & (distance <= rim_outer)
    depth = rng.uniform(0.12, 0.25)
    darkening = depth + (0.45 - depth) * np.clip(distance, 0.0, 1.0) ** 2
    changed = image.copy()
    changed[inside] = image[inside] * darkening[inside][:, None]
    changed[rim] = image[rim] + 0.45 * (255.0 - image[rim])
    return changed, inside | rim


def paste_defect(
    image: NDArray[np.uint8],
    kind: str,
    rng: np.random.Generator,
    *,
    source: NDArray[np.uint8] | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Draws one synthetic defect on a copy of ``image`` and returns it with its exact mask.

    Outside the mask the result equals ``image`` bit for bit; inside, the change is significant
    (soft edges are cut at 20 % of the defect's strength; a pasted patch can reproduce the odd
    original pixel).

    Args:
        image: ``(H, W, 3)`` uint8 RGB image, at least 16 x 16. It is not modified.
        kind: One of :data:`DEFECT_KINDS`.
        rng: Source of randomness (the result is a deterministic function of its state).
        source: For ``"cutpaste"``, an ``(h, w, 3)`` uint8 image to copy the patch from (e.g.
            another texture); by default a rotated patch of ``image`` itself. Ignored otherwise.

    Returns:
        ``(defective, mask)``: the defective ``(H, W, 3)`` uint8 image and the ``(H, W)`` bool
        mask of the pixels the defect changed (never empty).

    Raises:
        ValueError: For an unknown kind or an image that is not ``(H, W, 3)`` uint8 of at least
            16 x 16 pixels.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"Unknown defect kind {kind!r}; choose from {DEFECT_KINDS}.")
    clean = np.asarray(image)
    if clean.dtype != np.uint8 or clean.ndim != 3 or clean.shape[2] != 3:
        raise ValueError(
            f"paste_defect expects an (H, W, 3) uint8 RGB image, got {clean.dtype} {clean.shape}; "
            "convert it first, e.g. np.asarray(pil_image.convert('RGB'))."
        )
    if min(clean.shape[:2]) < _MIN_IMAGE_SIDE:
        raise ValueError(
            f"paste_defect needs at least {_MIN_IMAGE_SIDE} x {_MIN_IMAGE_SIDE} pixels, got {clean.shape[:2]}."
        )
    if source is not None:
        source = np.asarray(source)
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError("source must be an (h, w, 3) uint8 RGB image.")
    clean_float = clean.astype(np.float64)
    source_float = None if source is None else source.astype(np.float64)
    painters: dict[str, Callable[[], tuple[NDArray[np.float64], NDArray[np.bool_]]]] = {
        "scratch": lambda: _scratch(clean_float, rng),
        "blob": lambda: _blob(clean_float, rng),
        "cutpaste": lambda: _cutpaste(clean_float, rng, source_float),
        "hole": lambda: _hole(clean_float, rng),
    }
    for _ in range(_MAX_ATTEMPTS):
        changed, mask = painters[kind]()
        if mask.any():
            break
    else:  # pragma: no cover - needs an image far below any practical size
        raise RuntimeError(f"Could not place a {kind!r} defect on a {clean.shape} image.")
    changed_u8 = np.clip(np.rint(changed), 0, 255).astype(np.uint8)
    defective = np.where(mask[..., None], changed_u8, clean)
    return defective, mask


# --------------------------------------------------------------------------------------------
# Benchmark writer
# --------------------------------------------------------------------------------------------


def _stable_id(name: str) -> int:
    """A process-independent integer for a name (Python's hash() is salted)."""
    return zlib.crc32(name.encode("utf-8"))


def _sample_rng(seed: int, category: str, group: str, index: int) -> np.random.Generator:
    """The generator of one sample; independent of which other categories are written."""
    return np.random.default_rng([seed, _stable_id(category), _stable_id(group), index])


def _write_png(path: Path, array: NDArray[np.uint8]) -> None:
    image = Image.fromarray(array)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _check_names(values: Sequence[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    unknown = [value for value in values if value not in allowed]
    if unknown or not values or len(set(values)) != len(values):
        raise ValueError(f"{what} must be distinct names from {allowed}, got {values!r}.")
    return values


def _check_count(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _previous_categories(root: Path) -> set[str]:
    """Categories listed by a manifest this generator wrote earlier in ``root``."""
    manifest = root / "manifest.json"
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if content.get("generator") != __name__:
        return set()
    return {entry.get("category") for entry in content.get("files", [])} & set(SYNTHETIC_CATEGORIES)


def _clear_previous_benchmark(root: Path, categories: Iterable[str]) -> None:
    """Removes the category folders this call (or an earlier run) writes, plus README/manifest.

    Other content of ``root`` is left alone.
    """
    for category in sorted(set(categories) | _previous_categories(root)):
        folder = root / category
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in ("README.txt", "manifest.json"):
        (root / name).unlink(missing_ok=True)


def _readme(seed: int, categories: Sequence[str], parameters: dict[str, object], n_files: int) -> str:
    """The provenance note written as ``README.txt``."""
    sources = "\n".join(
        f"  - {category}: textures/{_TEXTURES[category].loader}.png (skimage.data.{_TEXTURES[category].loader}()), from "
        f"{_TEXTURES[category].source}, CC0 1.0"
        for category in categories
    )
    settings = "\n".join(f"  {key} = {value!r}" for key, value in parameters.items())
    return f"""Synthetic-defect anomaly-detection benchmark (MVTec AD layout)
===============================================================

Written by mrad_hf.data.synthetic (generator version {GENERATOR_VERSION}) with seed {seed}.
The same version, seed and parameters reproduce every file byte for byte.

Purpose: an offline stand-in for MVTec AD / VisA to exercise data loading, memory banks,
evaluation and demos. Results on it are not comparable to the MRAD paper's.

Layout:
  <category>/train/good/000.png
  <category>/test/good/000.png
  <category>/test/<defect>/000.png
  <category>/ground_truth/<defect>/000_mask.png   (0 = normal, 255 = defect; same size)
manifest.json lists all {n_files} images with label, defect kind and mask path.

Source textures (shipped with mrad-hf; scikit-image 0.26's skimage.data images, pixel for pixel):
{sources}
Normal images: random square crops (45-75 % of the texture side), random flips and 90-degree
rotations, bicubic resize, fixed per-category colour ramp.
Defects: scratch (thin bright/dark polyline), blob (colour spot, soft edge cut at 20 % strength),
cutpaste (re-lit rotated rectangle from another texture or elsewhere in the image), hole (dark
ellipse with a lit rim). Masks mark exactly the changed pixels.

Licence: the images derive only from CC0 1.0 material and may be used without restriction.
The generator code is Apache-2.0.

Parameters:
{settings}
"""


@dataclass(frozen=True)
class _SampleJob:
    """One image to write: where, and whether (and how) it is defective."""

    category: str
    split: str
    defect: str  # "good" or a defect kind
    index: int


def _benchmark_jobs(
    categories: Sequence[str],
    defect_kinds: Sequence[str],
    n_train_good: int,
    n_test_good: int,
    n_test_per_defect: int,
) -> list[_SampleJob]:
    jobs = []
    for category in categories:
        jobs += [_SampleJob(category, "train", "good", i) for i in range(n_train_good)]
        jobs += [_SampleJob(category, "test", "good", i) for i in range(n_test_good)]
        for kind in defect_kinds:
            jobs += [_SampleJob(category, "test", kind, i) for i in range(n_test_per_defect)]
    return jobs


def _write_sample(root: Path, job: _SampleJob, image_size: int, seed: int) -> dict[str, object]:
    """Generates and writes one image (and its mask); returns its manifest entry."""
    rng = _sample_rng(seed, job.category, f"{job.split}/{job.defect}", job.index)
    image = sample_normal_image(_colourised_texture(job.category), rng, image_size)
    name = f"{job.index:03d}"
    image_path = f"{job.category}/{job.split}/{job.defect}/{name}.png"
    mask_path = None
    if job.defect != "good":
        source = None
        if job.defect == "cutpaste" and rng.random() < 0.5:
            others = [other for other in SYNTHETIC_CATEGORIES if other != job.category]
            other = others[int(rng.integers(0, len(others)))]
            source = sample_normal_image(_colourised_texture(other), rng, image_size)
        image, mask = paste_defect(image, job.defect, rng, source=source)
        mask_path = f"{job.category}/ground_truth/{job.defect}/{name}_mask.png"
        _write_png(root / mask_path, mask.astype(np.uint8) * 255)
    _write_png(root / image_path, image)
    return {
        "category": job.category,
        "split": job.split,
        "label": int(job.defect != "good"),
        "defect": job.defect,
        "image": image_path,
        "mask": mask_path,
    }


def make_synthetic_benchmark(
    root: str | os.PathLike[str],
    *,
    categories: Sequence[str] = SYNTHETIC_CATEGORIES,
    defect_kinds: Sequence[str] = DEFECT_KINDS,
    n_train_good: int = 4,
    n_test_good: int = 6,
    n_test_per_defect: int = 3,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes a synthetic-defect benchmark in the MVTec AD folder layout (see module docstring).

    Every file is written atomically (temporary file, then ``os.replace``); for a given seed,
    parameters and generator version the output is identical byte for
    byte. Each sample has its own random generator derived from ``(seed, category, group,
    index)``, so a category's files do not depend on which other categories are requested.

    Args:
        root: Output folder; created if missing.
        categories: Texture categories, a subset of :data:`SYNTHETIC_CATEGORIES`.
        defect_kinds: Defect folders per category, a subset of :data:`DEFECT_KINDS`.
        n_train_good: Normal images in ``train/good``.
        n_test_good: Normal images in ``test/good``.
        n_test_per_defect: Defective images (and masks) per defect kind.
        image_size: Side of the square images and masks, at least 32.
        seed: Seed of the whole benchmark.
        overwrite: If ``root`` is not empty, replace the category folders this call writes (and
            those listed by an earlier manifest of this generator), ``README.txt`` and
            ``manifest.json``; other content of ``root`` is left alone. If False, a non-empty
            ``root`` is an error.
        progress: Show a tqdm progress bar.

    Returns:
        The absolute path of ``root``.

    Raises:
        FileExistsError: If ``root`` is not empty and ``overwrite`` is False, or is a file.
        ValueError: For unknown or duplicated categories or defect kinds, or invalid counts.
    """
    categories = _check_names(categories, SYNTHETIC_CATEGORIES, "categories")
    defect_kinds = _check_names(defect_kinds, DEFECT_KINDS, "defect_kinds")
    _check_count(n_train_good, "n_train_good", 0)
    _check_count(n_test_good, "n_test_good", 0)
    _check_count(n_test_per_defect, "n_test_per_defect", 1)
    _check_count(image_size, "image_size", 32)
    _check_count(seed, "seed", 0)

    root_path = Path(root).absolute()
    if root_path.exists() and not root_path.is_dir():
        raise FileExistsError(f"{root_path} exists and is not a folder; choose another output path.")
    if root_path.is_dir() and any(root_path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root_path} exists and is not empty. Pass overwrite=True (CLI: --overwrite) to "
                "replace the synthetic benchmark there, or choose an empty or new folder."
            )
        _clear_previous_benchmark(root_path, categories)
    root_path.mkdir(parents=True, exist_ok=True)

    jobs = _benchmark_jobs(categories, defect_kinds, n_train_good, n_test_good, n_test_per_defect)
    entries = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="synthetic benchmark", unit="image")
    try:
        for job in jobs:
            entries.append(_write_sample(root_path, job, image_size, seed))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    parameters: dict[str, object] = {
        "categories": list(categories),
        "defect_kinds": list(defect_kinds),
        "n_train_good": int(n_train_good),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "image_size": int(image_size),
    }
    manifest = {
        "generator": __name__,
        "generator_version": GENERATOR_VERSION,
        "layout": "MVTec AD",
        "seed": int(seed),
        "parameters": parameters,
        "files": entries,
    }
    _write_text(root_path / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _write_text(root_path / "README.txt", _readme(int(seed), categories, parameters, len(entries)))
    return root_path
