# SPDX-License-Identifier: Apache-2.0
"""Labelled samples for bank building, calibration and evaluation: labels, (image, label, mask, provenance) rows,
batches and progress bars (paper Sec. 3.2: the memory is built from labelled auxiliary images)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..models.mrad.image_processing_mrad import MRADInputError
from .files import file_sha256

__all__ = ["batched", "iter_samples", "label_value", "progress_bar"]

_LABEL_NAMES = {"normal": 0, "good": 0, "ok": 0, "anomaly": 1, "anomalous": 1, "defect": 1, "bad": 1, "ng": 1}


def label_value(label: Any, position: int) -> int:
    if isinstance(label, str):
        if label.lower() not in _LABEL_NAMES:
            raise ValueError(f"Sample {position}: unknown label {label!r}; use 0/1 or 'normal'/'anomaly'.")
        return _LABEL_NAMES[label.lower()]
    value = int(label)
    if value not in (0, 1):
        raise ValueError(f"Sample {position}: label must be 0 (normal) or 1 (anomaly), got {label!r}.")
    return value


def _rows_read_one_by_one(samples: Iterable[Any]) -> Iterator[Any]:
    """The samples in order; a row that fails while it is produced (a `datasets` Image column decodes the file itself)
    raises `MRADInputError` naming the row and the fix, not a raw PIL error."""
    iterator = iter(samples)
    position = 0
    while True:
        try:
            sample = next(iterator)
        except StopIteration:
            return
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError / truncated files are OSErrors
            raise MRADInputError(
                f"Sample {position} could not be read ({type(error).__name__}: {error}). Skip unreadable files with "
                "mrad_hf.data.loaders.iter_readable_rows(dataset, processor.load_pair, on_error='skip'), or cast the image column with "
                "datasets.Image(decode=False) so that MRAD's decoder reads the file and names it."
            ) from error
        yield sample
        position += 1


def iter_samples(samples: Iterable[Any]) -> Iterator[tuple[Any, int, Any, dict[str, Any]]]:
    """Normalise dict / tuple samples to (image, label, mask, provenance).

    provenance = {"id", "source", "sha256"}: the sample's `id` (relative to its dataset root); for a sample given only
    as a path, its file name and, as source, its folder's name (never an absolute path); `sha256` of the image file's
    bytes when the image is a path (or the row's `sha256`), else None.
    """
    for position, sample in enumerate(_rows_read_one_by_one(samples)):
        if isinstance(sample, dict):
            if "image" not in sample or "label" not in sample:
                raise ValueError(f"Sample {position} needs 'image' and 'label' keys, got {sorted(sample)}.")
            image, label, mask = sample["image"], sample["label"], sample.get("mask")
            sample_id, source, sha = sample.get("id"), sample.get("source"), sample.get("sha256")
            path = sample.get("path")
        else:
            if len(sample) not in (2, 3):
                raise ValueError(f"Sample {position} must be (image, label) or (image, label, mask).")
            image, label, mask = sample[0], sample[1], sample[2] if len(sample) == 3 else None
            sample_id = source = sha = path = None
        if isinstance(image, (str, os.PathLike)):
            path = image
            sha = sha or file_sha256(image)
        if sample_id is not None and os.path.isabs(os.fspath(sample_id)):
            sample_id = Path(sample_id).name
        if sample_id is None and path is not None:
            sample_id, source = Path(path).name, source or Path(path).parent.name or None
        provenance = {
            "id": str(sample_id if sample_id is not None else f"sample-{position}"),
            "source": source,
            "sha256": sha,
        }
        yield image, label_value(label, position), mask, provenance


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, description: str, enabled: bool, unit: str = "img"):
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of transformers, but stay usable without it
        return _NullBar()
    return tqdm(total=total, desc=description, unit=unit)
