# SPDX-License-Identifier: Apache-2.0
"""Builders of the image and mask files the reliability tests feed to MRAD (valid, odd and broken ones)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def texture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (compresses like a photo, so JPEG/PNG mutations hit real entropy-coded data)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def valid_image_bytes(seed: int = 0) -> dict[str, bytes]:
    """One small valid file per container the fuzz test mutates."""
    rgb = Image.fromarray(texture(seed=seed))
    return {
        "png": encode(rgb, "PNG"),
        "jpg": encode(rgb, "JPEG", quality=90),
        "tif": encode(rgb, "TIFF"),
        "tif16": encode(Image.fromarray((texture(seed=seed)[..., 0].astype(np.uint16) * 257)), "TIFF"),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(rgb.convert("P"), "GIF"),
        "webp": encode(rgb, "WEBP", quality=80),
    }


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption: bit flips, a truncation, overwritten or inserted or deleted bytes (header often kept)."""
    buffer = bytearray(data)
    kind = int(rng.integers(0, 5))
    if kind == 0:  # flip 1-8 bits anywhere
        for _ in range(int(rng.integers(1, 9))):
            position = int(rng.integers(0, len(buffer)))
            buffer[position] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # truncate
        del buffer[int(rng.integers(0, len(buffer))) :]
    elif kind == 2:  # overwrite a run with random bytes
        start = int(rng.integers(0, len(buffer)))
        length = int(rng.integers(1, 64))
        buffer[start : start + length] = rng.integers(
            0, 256, min(length, len(buffer) - start), dtype=np.uint8
        ).tobytes()
    elif kind == 3:  # insert random bytes
        start = int(rng.integers(0, len(buffer)))
        buffer[start:start] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
    else:  # delete a run
        start = int(rng.integers(0, len(buffer)))
        del buffer[start : start + int(rng.integers(1, 64))]
    return bytes(buffer)


def fuzz_cases(count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` deterministic (name, bytes) cases: a quarter pure random bytes (some with a real magic number), the rest mutated files."""
    rng = np.random.default_rng(seed)
    valid = valid_image_bytes(seed)
    kinds = sorted(valid)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF89a", b"RIFF"]
    cases = []
    for index in range(count):
        if index % 4 == 0:
            body = rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8).tobytes()
            if index % 8 == 0:
                body = magics[int(rng.integers(0, len(magics)))] + body
            cases.append((f"random_{index:04d}.png", body))
        else:
            kind = kinds[int(rng.integers(0, len(kinds)))]
            data = valid[kind]
            for _ in range(int(rng.integers(1, 4))):
                data = mutate(data, rng) if data else data
            extension = "tif" if kind == "tif16" else kind
            cases.append((f"mutated_{index:04d}_{kind}.{extension}", data))
    return cases


def write_folder_dataset(root: Path, samples: list[dict]) -> Path:
    """`samples` (as `conftest.make_samples` makes them) in the `folder` layout: good/, scratch/, `<stem>_mask.png`."""
    for index, sample in enumerate(samples):
        folder = root / ("scratch" if sample["label"] else "good")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{index:03d}.png")
        if sample["mask"] is not None:
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(folder / f"{index:03d}_mask.png")
    return root
