# SPDX-License-Identifier: Apache-2.0
"""Reading a loaded dataset's files: masks binarised as the reference does, unreadable rows reported or refused.

**Mask convention.** A loader's ``mask`` column holds the raw annotation file; it is *not* binarised. Several sets
store non-binary masks: VisA masks hold 0 and small defect ids (1, 2, ...), and Kvasir masks are JPEGs with
compression noise. The MRAD reference (arXiv 2602.00522) binarises every mask with
``np.array(mask.convert("L")) > 0``, and consumers must do the same. :func:`binarize_mask` does it for one mask
(0/255, mode ``"L"``). :func:`with_binary_masks` returns a view of a dataset whose ``mask`` column is already 0/255.
That view uses ``with_transform``, so a later ``with_format`` or ``with_transform`` replaces it.

**Unreadable files.** The loaders only list files; they decode nothing, so a corrupt, truncated or empty image is
found when it is read. :func:`iter_readable_rows` reads rows through MRAD's own decoder
(``MRADImageProcessor.load_pair``: image, mask, mask size) and, with ``on_error="skip"``, reports and skips a row
whose image or mask cannot be used instead of stopping the run; ``mrad build-bank`` and ``mrad evaluate`` use it
(``--on-error skip|fail``). :func:`readable_subset` and :func:`readable_items` apply the same rule to a whole dataset
and to a list of items.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import PIL.Image
from datasets import Dataset, Image

from ..memory.files import file_sha256

__all__ = [
    "binarize_mask",
    "iter_readable_rows",
    "readable_items",
    "readable_subset",
    "undecoded_images",
    "with_binary_masks",
]


def binarize_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """Binarises a mask as the MRAD reference does: grey value ``> 0`` -> 255, else 0 (mode ``"L"``)."""
    return mask.convert("L").point(lambda value: 255 if value > 0 else 0)


def _binarize_mask_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if "mask" in batch:
        batch["mask"] = [None if mask is None else binarize_mask(mask) for mask in batch["mask"]]
    return batch


def with_binary_masks(dataset: Dataset) -> Dataset:
    """Returns a view of ``dataset`` whose decoded ``mask`` is binary 0/255 (mode ``"L"``).

    This is a lazy ``with_transform``: it replaces any earlier format or transform, and a later
    ``with_format`` / ``with_transform`` replaces it in turn.
    """
    return dataset.with_transform(_binarize_mask_batch)


_ON_ERROR = ("skip", "fail")


def _check_on_error(on_error: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}.")


def undecoded_images(dataset: Any) -> Any:
    """``dataset`` with its ``Image`` columns undecoded, so that files are read by MRAD's decoder (whose errors name
    the file and the fix), not by PIL inside ``datasets`` (raw ``OSError``). Anything that is not a
    ``datasets.Dataset`` is returned as it is."""
    if not isinstance(dataset, Dataset):
        return dataset
    for column in ("image", "mask"):
        feature = dataset.features.get(column)
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


def _row_name(row: Mapping[str, Any]) -> str:
    image = row.get("image")
    return str(row.get("path") or (image.get("path") if isinstance(image, dict) else image))


def _decoded_rows(dataset: Dataset, load_pair, on_error: str, failures: list[dict[str, str]] | None):
    """(index, undecoded row, image, mask) of every row ``load_pair`` can decode; an ``MRADInputError`` is appended to
    ``failures`` and the row skipped (``on_error="skip"``), or raised (``"fail"``)."""
    from ..models.mrad.image_processing_mrad import MRADInputError

    _check_on_error(on_error)
    for index, row in enumerate(undecoded_images(dataset)):
        try:
            image, mask = load_pair(row["image"], row.get("mask"))
        except MRADInputError as error:
            if on_error == "fail":
                raise
            if failures is not None:
                failures.append({"path": _row_name(row), "error": str(error)})
            continue
        yield index, row, image, mask


def iter_readable_rows(
    dataset: Dataset,
    load_pair: Callable[[Any, Any], tuple[Any, Any]],
    *,
    on_error: str = "skip",
    failures: list[dict[str, str]] | None = None,
) -> Iterable[dict[str, Any]]:
    """Rows of ``dataset`` with ``image`` and ``mask`` decoded by ``load_pair(image, mask)``, unreadable rows skipped.

    ``load_pair`` is normally ``MRADImageProcessor.load_pair`` (returns a PIL image and a bool mask or None). The
    ``Image`` columns are read undecoded, so every file goes through MRAD's decoder and its errors. With
    ``on_error="skip"`` a row whose image or mask raises ``MRADInputError`` is appended to ``failures`` as
    ``{"path": ..., "error": ...}`` and skipped; with ``on_error="fail"`` the error propagates. Each row also gets
    ``sha256``, the :func:`file_sha256` of its image file (None without a file), which banks store per entry.
    """
    for _, row, image, mask in _decoded_rows(dataset, load_pair, on_error, failures):
        source = row.get("image")
        path = source.get("path") if isinstance(source, dict) else row.get("path")
        yield {**row, "image": image, "mask": mask, "sha256": file_sha256(path) if path else None}


def readable_subset(
    dataset: Dataset,
    load_pair: Callable[[Any, Any], tuple[Any, Any]],
    *,
    on_error: str = "skip",
    failures: list[dict[str, str]] | None = None,
) -> Dataset:
    """``dataset`` without the rows whose image or mask MRAD's decoder cannot use (as :func:`iter_readable_rows`).

    For consumers that take a whole dataset and decode it themselves (training, ``build_memory_bank``): every file
    is read once here, so a truncated or corrupt file is reported by name (``failures``, ``on_error="skip"``) or
    raised as ``MRADInputError`` (``"fail"``) before the run starts, instead of stopping it with a raw PIL error.
    """
    keep = [index for index, *_ in _decoded_rows(dataset, load_pair, on_error, failures)]
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def readable_items(
    items: Sequence[Any],
    load: Callable[[Any], Any],
    *,
    on_error: str = "skip",
    failures: list[dict[str, str]] | None = None,
) -> list[Any]:
    """The ``items`` (paths, PIL images, ``(image, mask)`` pairs, ...) that ``load(item)`` decodes without an
    ``MRADInputError``; the others are listed in ``failures`` (``on_error="skip"``) or raise (``"fail"``)."""
    from ..models.mrad.image_processing_mrad import MRADInputError

    _check_on_error(on_error)
    kept = []
    for item in items:
        try:
            load(item)
        except MRADInputError as error:
            if on_error == "fail":
                raise
            if failures is not None:
                first = item[0] if isinstance(item, tuple) else item
                name = str(first) if isinstance(first, (str, os.PathLike)) else type(first).__name__
                failures.append({"path": name, "error": str(error)})
            continue
        kept.append(item)
    return kept
