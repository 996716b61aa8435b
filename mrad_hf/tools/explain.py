# SPDX-License-Identifier: Apache-2.0
"""Explanations by retrieval: which memory entries drove an image's score and its most anomalous region.

MRAD scores by soft retrieval, softmax(similarity) V, so the entries with the largest similarity carry the
largest weight in the score. For one image, `explain_images` reports

* **image level**: the top-k image entries by the similarity the image score uses;
* **region level**: the patch with the highest anomaly probability among the per-patch probabilities the
  map is made of (`patch_probabilities[..., 1]`, or MRAD-CLIP's `text_probabilities[..., 1]`, before
  upsampling and smoothing) and the top-k region prototypes for that patch's query;

each with its provenance (`mrad_hf.memory.tools.provenance`: source, image id, kind), its label, its similarity
(the pre-softmax retrieval logit, `model.retrieval_logits(level, queries)`: cosine / tau for MRAD-TF,
projected dot products for the trained variants) and its softmax weight (its share of the retrieval).
Queries come from `model.retrieval_queries(model.extract_features(pixel_values))`, the model's own path.

`render_explanation` draws one PNG panel: query image with the region boxed, heatmap overlay, and the
nearest labelled examples. Thumbnails are read only from an `image_root` the user names (`--image-root`,
`image_root=`), never from whatever path a bank records: an entry's image id must be relative, stay inside the
root after symlinks are resolved (`resolve_thumbnail`) and name a regular file, which is decoded at thumbnail size
(`Image.draft` for JPEG, `Image.reduce`) and only up to `THUMBNAIL_MAX_PIXELS`. Anything else (no root, an
absolute or escaping id, a missing, corrupt or huge file) is a grey placeholder tile with a one-line note; it never
stops the run. `public_explanation` removes server paths from an explanation before it is shown to a client.
Imports only torch, numpy, Pillow and siblings, so it can travel with the pipeline.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.files import PathOutsideRoot, is_absolute_text, path_in_root
from ..memory.files import atomic_write
from ..memory.tools import provenance
from ..models.mrad.memory_bank_mrad import MemoryBank
from .visualization import overlay_heatmap

__all__ = [
    "DEFAULT_TOP_K",
    "THUMBNAIL_MAX_PIXELS",
    "explain_images",
    "public_explanation",
    "render_explanation",
    "resolve_thumbnail",
    "save_explanation",
]

DEFAULT_TOP_K = 5
#: Largest source image (after JPEG draft scaling) decoded for a thumbnail; bigger ones get a placeholder.
THUMBNAIL_MAX_PIXELS = 25_000_000


def _attached_bank(model) -> MemoryBank:
    """The attached memory's labels and provenance; provenance needs no keys, so zero-width key views keep the
    bank's checks (finiteness, checksum) from reading the whole memory on every call."""
    memory = model.memory
    return MemoryBank(
        image_keys=memory.image_keys[:, :0],
        image_values=memory.image_values,
        patch_keys=memory.patch_keys[:, :0],
        patch_values=memory.patch_values,
        patch_sources=memory.patch_sources,
        metadata=dict(model.memory_bank_metadata or {}),
    )


def _neighbours(bank: MemoryBank, level: str, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
    weights = torch.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(logits.float(), min(top_k, logits.shape[-1]))
    entries = []
    for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
        entry = provenance(bank, level, index)
        entry.update(rank=rank, similarity=float(value), weight=float(weights[index]))
        entries.append(entry)
    return entries


@torch.no_grad()
def explain_images(
    model, pixel_values: torch.Tensor, *, top_k: int = DEFAULT_TOP_K, outputs=None
) -> list[dict[str, Any]]:
    """One explanation dict per image of the batch (JSON-able; see the module docstring for the fields).

    `outputs` (the model's output for the same `pixel_values`) avoids a second scoring pass when given.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if outputs is None:
        outputs = model(pixel_values=pixel_values)
    image_queries, patch_queries = model.retrieval_queries(model.extract_features(pixel_values))
    bank = _attached_bank(model)
    image_logits = model.retrieval_logits("image", image_queries)
    # the probabilities the map is made of: the pixel retrieval (MRAD-TF/FT) or the text map (MRAD-CLIP)
    map_probabilities = getattr(outputs, "text_probabilities", None)
    anomaly = (outputs.patch_probabilities if map_probabilities is None else map_probabilities)[..., 1].float()
    grid = int(round(anomaly.shape[1] ** 0.5))
    explanations = []
    for b in range(pixel_values.shape[0]):
        patch = int(anomaly[b].argmax())
        row, col = divmod(patch, grid)
        patch_logits = model.retrieval_logits("patch", patch_queries[b, patch][None])[0]
        explanations.append(
            {
                "score": float(outputs.anomaly_score[b]),
                "image": {
                    "p_anomaly": float(outputs.image_probabilities[b, 1]),
                    "neighbours": _neighbours(bank, "image", image_logits[b], top_k),
                },
                "region": {
                    "patch_index": patch,
                    "row": row,
                    "col": col,
                    "grid_size": grid,
                    "box": [col / grid, row / grid, (col + 1) / grid, (row + 1) / grid],  # x0, y0, x1, y1 as fractions
                    "p_anomaly": float(anomaly[b, patch]),
                    "neighbours": _neighbours(bank, "patch", patch_logits, top_k),
                },
            }
        )
    return explanations


# ---------------------------------------------------------------------- thumbnails
_OUTSIDE_NOTES = {
    "absolute": "absolute image id, not read",
    "parent": "image id leaves the image root",
    "symlink": "image id leaves the image root (symlink)",
}


def resolve_thumbnail(image_id: str | None, image_root: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """(the file to draw, None), or (None, a one-line note why there is no thumbnail); never raises.

    Only a relative id without `..` that resolves (symlinks followed) to a regular file inside `image_root` is drawn
    (`data.files.path_in_root`, the one rule for paths read from a file). An id the system cannot use (a NUL byte, a
    name over the file-name limit) is a note too: one bad entry never stops a run.
    """
    if image_root is None:
        return None, "no image root given"
    if not image_id:
        return None, "entry has no image id"
    try:
        root = Path(image_root).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None, "image root not found"
    try:
        candidate = path_in_root(root, str(image_id)).resolve()
        if not candidate.exists():
            return None, "file not found under the image root"
        if not candidate.is_file():
            return None, "not a regular file"
    except PathOutsideRoot as error:
        return None, _OUTSIDE_NOTES.get(error.kind, "unusable image id")
    except (OSError, RuntimeError, ValueError) as error:  # e.g. ENAMETOOLONG from exists()
        return None, f"unusable image id ({getattr(error, 'strerror', None) or type(error).__name__})"
    return candidate, None


def _load_thumbnail(path: Path, size: int) -> Image.Image:
    try:
        with warnings.catch_warnings():  # between 1x and 2x PIL's limit it only warns; the pixel cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            source = Image.open(path)  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError("too large for a thumbnail (over PIL's decompression-bomb limit)") from None
    with source:
        if source.format == "JPEG":
            source.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale
        width, height = source.size
        if width * height > THUMBNAIL_MAX_PIXELS:
            raise ValueError(f"{width}x{height} px is too large for a thumbnail")
        factor = max(1, min(width, height) // size)
        image = source.reduce(factor) if factor > 1 else source
        return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def _thumbnail(entry: dict[str, Any], size: int, image_root=None, notes: list[str] | None = None) -> Image.Image:
    label = "anomaly" if entry["label"] else "normal"
    colour = (200, 40, 40) if entry["label"] else (40, 150, 60)
    image_id = entry.get("image_id")
    path, note = resolve_thumbnail(image_id, image_root)
    tile = None
    if path is not None:
        try:
            tile = _load_thumbnail(path, size)
        except (
            Exception
        ) as error:  # any decoder failure (OSError, SyntaxError, DecompressionBombError, ...) is a placeholder
            message = (str(error).splitlines() or [""])[0].replace(str(path), "<file>")[:80]
            note = f"unreadable ({type(error).__name__}: {message})"
    if tile is None:
        if notes is not None and image_root is not None:
            notes.append(f"thumbnail of '{image_id}': {note}")
        tile = Image.new("RGB", (size, size), (225, 225, 225))
        shown = (
            os.path.basename(str(image_id))
            if image_id and is_absolute_text(str(image_id))
            else (image_id or "unknown")
        )
        text = "\n".join(textwrap.wrap(f"no image: {shown}", 18)[:3] + textwrap.wrap(note, 18)[:3])
        ImageDraw.Draw(tile).multiline_text((4, size // 4), text, fill="black")
    ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline=colour, width=3)
    caption = Image.new("RGB", (size, 40), "white")
    text = f"#{entry['rank']} {entry['kind']} ({label})\nsim {entry['similarity']:.3f} w {entry['weight']:.2f}\n{entry['source']}"
    ImageDraw.Draw(caption).multiline_text((2, 1), text, fill=colour, spacing=1)
    out = Image.new("RGB", (size, size + 40), "white")
    out.paste(tile, (0, 0))
    out.paste(caption, (0, size))
    return out


def public_explanation(explanation: dict[str, Any]) -> dict[str, Any]:
    """A copy of `explanation` that names no path of the machine it ran on: an absolute image id becomes its file
    name (with `"image_id_redacted": True`)."""
    out = {**explanation}
    for level in ("image", "region"):
        neighbours = []
        for entry in explanation[level]["neighbours"]:
            entry = dict(entry)
            image_id = entry.get("image_id")
            if image_id and is_absolute_text(str(image_id)):
                entry.update(image_id=os.path.basename(str(image_id).replace("\\", "/")), image_id_redacted=True)
            neighbours.append(entry)
        out[level] = {**explanation[level], "neighbours": neighbours}
    return out


def render_explanation(
    image: Image.Image,
    anomaly_map: np.ndarray,
    explanation: dict[str, Any],
    *,
    tile: int = 160,
    title: str | None = None,
    image_root: str | os.PathLike | None = None,
    notes: list[str] | None = None,
) -> Image.Image:
    """One panel: row 1 = query (most anomalous patch boxed) | heatmap overlay; rows 2-3 = nearest image entries
    and nearest region prototypes of that patch. Thumbnails come only from `image_root` (see `resolve_thumbnail`);
    `notes`, when given, receives one line per placeholder drawn although a root was given."""
    base = image.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = (v * tile for v in explanation["region"]["box"])
    ImageDraw.Draw(base).rectangle([x0, y0, x1, y1], outline=(255, 255, 0), width=2)
    heat_map = np.asarray(
        Image.fromarray(np.asarray(anomaly_map, dtype=np.float32)).resize((tile, tile), Image.Resampling.BILINEAR)
    )
    heat = overlay_heatmap(base, heat_map)
    rows = [
        ("query | heatmap", [base, heat]),
        (
            "nearest image entries",
            [_thumbnail(e, tile, image_root, notes) for e in explanation["image"]["neighbours"]],
        ),
        (
            "nearest regions (most anomalous patch)",
            [_thumbnail(e, tile, image_root, notes) for e in explanation["region"]["neighbours"]],
        ),
    ]
    strip, gap = 18, 4
    columns = max(len(tiles) for _, tiles in rows)
    height = sum(strip + max(t.height for t in tiles) for _, tiles in rows) + strip
    panel = Image.new("RGB", (columns * (tile + gap) + gap, height), "white")
    draw = ImageDraw.Draw(panel)
    header = title or f"score {explanation['score']:.4f}   p_anomaly(image) {explanation['image']['p_anomaly']:.3f}"
    draw.text((gap, 3), header, fill="black")
    top = strip
    for name, tiles in rows:
        draw.text((gap, top + 3), name, fill="black")
        top += strip
        for index, tile_image in enumerate(tiles):
            panel.paste(tile_image, (gap + index * (tile + gap), top))
        top += max(t.height for t in tiles)
    return panel


def save_explanation(
    path: str | os.PathLike, image: Image.Image, anomaly_map: np.ndarray, explanation: dict[str, Any], **kwargs
) -> Path:
    """Render and write the explanation panel PNG atomically; returns the path."""
    path = Path(path)
    panel = render_explanation(image, anomaly_map, explanation, **kwargs)
    atomic_write(path, lambda tmp: panel.save(tmp, format="PNG"))
    return path
