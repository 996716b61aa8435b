# SPDX-License-Identifier: Apache-2.0
"""Heatmap overlays as PNG: what an inspection engineer looks at (image | heatmap overlay | ground truth).

Pure numpy + Pillow (no matplotlib). The colour map is a piecewise-linear "jet" (blue = low, red = high),
the same family the reference's `utils/visualization.py` uses through OpenCV. Maps are scaled with a fixed
range (`value_range`, default [0, 1] for probabilities) so that panels of different images are comparable;
pass `value_range=None` to stretch each map to its own min-max, as the reference visualiser does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..memory.files import atomic_write

__all__ = ["colorize", "overlay_heatmap", "render_panel", "save_panel"]

_JET_STOPS = np.array(
    [
        [0.0, 0.0, 0.0, 0.5],
        [0.11, 0.0, 0.0, 1.0],
        [0.125, 0.0, 0.0, 1.0],
        [0.34, 0.0, 0.86, 1.0],
        [0.35, 0.0, 0.9, 0.97],
        [0.64, 1.0, 1.0, 0.0],
        [0.66, 1.0, 0.86, 0.0],
        [0.89, 1.0, 0.0, 0.0],
        [1.0, 0.5, 0.0, 0.0],
    ]
)


def colorize(values: np.ndarray, value_range: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 jet colours."""
    values = np.asarray(values, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if value_range is None else value_range
    scaled = np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    channels = [np.interp(scaled, _JET_STOPS[:, 0], _JET_STOPS[:, index]) for index in (1, 2, 3)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def overlay_heatmap(
    image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, value_range=(0.0, 1.0)
) -> Image.Image:
    """Blend the colourised map over the image (resized to the map's size if they differ)."""
    base = image.convert("RGB")
    heat = Image.fromarray(colorize(anomaly_map, value_range))
    if heat.size != base.size:
        heat = heat.resize(base.size, Image.Resampling.BILINEAR)
    return Image.blend(base, heat, alpha)


def render_panel(
    image: Image.Image,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    title: str | None = None,
    value_range=(0.0, 1.0),
) -> Image.Image:
    """Side-by-side panel: input, heatmap overlay and (when given) the ground-truth mask, with a title strip."""
    base = image.convert("RGB")
    tiles = [base, overlay_heatmap(base, anomaly_map, value_range=value_range)]
    if mask is not None:
        mask_image = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).convert("RGB")
        tiles.append(mask_image.resize(base.size, Image.Resampling.NEAREST))
    strip = 18 if title else 0
    panel = Image.new("RGB", (base.width * len(tiles), base.height + strip), "white")
    for index, tile in enumerate(tiles):
        panel.paste(tile, (index * base.width, strip))
    if title:
        ImageDraw.Draw(panel).text((4, 3), title, fill="black")
    return panel


def save_panel(path: str | os.PathLike, image: Image.Image, anomaly_map: np.ndarray, **kwargs) -> Path:
    """Render and write a panel PNG atomically; returns the path."""
    path = Path(path)
    panel = render_panel(image, anomaly_map, **kwargs)
    atomic_write(path, lambda tmp: panel.save(tmp, format="PNG"))
    return path
