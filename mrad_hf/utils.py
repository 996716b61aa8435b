# SPDX-License-Identifier: Apache-2.0
"""Small shared helpers: labelled-sample normalisation, batching and progress bars (no MRAD math here).

Used by the model (bank building), the trainer and the calibration tools, so that every entry point accepts the
same sample formats: dicts with `image`, `label` (0/1 or "normal"/"anomaly"), optional `mask` and `id`/`path`,
or tuples `(image, label[, mask])`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["label_value", "iter_samples", "batched", "progress_bar"]


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


def iter_samples(samples: Iterable[Any]) -> Iterator[tuple[Any, int, Any, str]]:
    """Normalise dict / tuple samples to (image, label, mask, id)."""
    for position, sample in enumerate(samples):
        if isinstance(sample, dict):
            if "image" not in sample or "label" not in sample:
                raise ValueError(f"Sample {position} needs 'image' and 'label' keys, got {sorted(sample)}.")
            image, label, mask = sample["image"], sample["label"], sample.get("mask")
            sample_id = sample.get("id") or sample.get("path")
        else:
            if len(sample) not in (2, 3):
                raise ValueError(f"Sample {position} must be (image, label) or (image, label, mask).")
            image, label, mask = sample[0], sample[1], sample[2] if len(sample) == 3 else None
            sample_id = None
        if sample_id is None:
            sample_id = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"sample-{position}"
        yield image, label_value(label, position), mask, str(sample_id)


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
