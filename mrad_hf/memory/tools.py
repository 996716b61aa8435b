# SPDX-License-Identifier: Apache-2.0
"""Living memory banks: provenance, add a line's own labelled images, merge banks, de-duplicate, remove by source.

MRAD's memory is explicit data, so it can be edited without any training step. Every function here takes
`MemoryBank` objects and returns a new one (inputs are not modified); `mrad bank add|merge|remove|info`
wraps them. Provenance stays aligned with the keys throughout: image entry i keeps its source and image
id (`metadata["image_sources"][i]`, `metadata["image_ids"][i]`), and region prototypes keep pointing at
their image entry through `patch_sources`.

* **provenance** (`provenance`, `image_ids`, `image_sources`, `image_sha256`): where each entry came from, read
  from the per-image metadata lists (`PER_IMAGE_FIELDS`), with defaults for banks that do not record them.

* **add** (`add_samples`): entries for new labelled images are computed with the model's own
  `build_memory_bank(..., attach=False)` (same features, same region rule as the rest of the bank) and
  appended. Images with a mask give an image entry plus a normal and an anomalous region prototype. An
  anomalous image without a mask gives an anomalous **image-level entry only**: no region prototype, since
  its defect pixels are unknown and its whole image is not a normal region (the reference would add one;
  `add_samples` removes it and counts these images in its history record). `samples_from_files` pairs
  `<stem>_mask.png` files with their images by the folder loader's rule (`data.files.pair_image_files`).
* **merge** (`merge_banks`): refused unless the banks were built with the same backbone and feature
  settings (`check_mergeable`: key widths, the backbone fingerprint, `feature_settings`).
* **de-duplicate** (`deduplicate`), the rule: entries are visited in bank order (for a merge: the first
  bank, then the next), and an entry is dropped when an entry already kept *at the same level, with the
  same label* has cosine similarity > `threshold` with it (default `DEFAULT_DEDUP_THRESHOLD`). Region
  prototypes are de-duplicated first; an image entry is then dropped only if, in addition, none of its
  region prototypes survived, so every remaining prototype still has its image entry and provenance. The
  earlier entry always wins, so a public bank's entries are never replaced by a later near-copy; when
  adding images, only new entries can be dropped (the existing bank is kept whole).
* **remove** (`remove_sources`): drops every image entry of the named sources and the region prototypes
  built from them.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.files import IgnoredFile, pair_image_files
from ..data.reading import iter_readable_rows
from ..memory.samples import label_value
from ..models.mrad.memory_bank_mrad import MemoryBank, MemoryBankError, feature_settings
from ..models.mrad.retrieval_mrad import l2_normalize
from .building import CountedRows, build_memory_bank

__all__ = [
    "DEFAULT_DEDUP_THRESHOLD",
    "ENTRY_KINDS",
    "add_samples",
    "bank_info",
    "check_mergeable",
    "deduplicate",
    "entries_from_samples",
    "image_ids",
    "image_sha256",
    "image_sources",
    "merge_banks",
    "provenance",
    "remove_sources",
    "samples_from_files",
    "select_entries",
    "unmasked_anomalies",
]

#: Cosine similarity above which two same-label keys count as near-identical: meant to catch the same
#: image added twice (or re-encoded), not similar parts. Soft retrieval sums over entries, so a copy
#: doubles an entry's weight; dropping it restores that, while dropping merely *similar* entries would
#: change the scores, hence a threshold this close to 1. Random-weight backbones (tests, offline demo)
#: give nearly collinear features, for which even distinct images can exceed it.
DEFAULT_DEDUP_THRESHOLD = 0.999
#: Kinds of memory entries, as `provenance` reports them.
ENTRY_KINDS = ("image", "normal region", "anomalous region")


def _labels(values: torch.Tensor) -> torch.Tensor:
    return values.argmax(dim=1) if len(values) else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------- provenance
def image_ids(bank: MemoryBank) -> list[str]:
    """The id of each image entry (relative to its dataset root, or a file name); `entry-<i>` where none is known."""
    ids = bank.metadata.get("image_ids")
    return [str(i) for i in ids] if ids is not None else [f"entry-{i}" for i in range(len(bank.image_keys))]


def image_sources(bank: MemoryBank) -> list[str]:
    """The source (dataset or folder) of each image entry; the bank's `source` where none is recorded per entry."""
    sources = bank.metadata.get("image_sources")
    return [str(s) for s in sources] if sources is not None else [_source_name(bank)] * len(bank.image_keys)


def image_sha256(bank: MemoryBank) -> list[str | None]:
    """SHA-256 of each image entry's file bytes (None where unknown), to find test images that are in the bank."""
    hashes = bank.metadata.get("image_sha256")
    return list(hashes) if hashes is not None else [None] * len(bank.image_keys)


def provenance(bank: MemoryBank, level: str, index: int) -> dict[str, Any]:
    """Where entry `index` of the "image" or "patch" memory came from: `{"level", "index", "kind" (ENTRY_KINDS),
    "label" (0/1), "source", "image_id", "image_index"}` (image_index -1 and image_id None if unknown)."""
    if level not in ("image", "patch"):
        raise ValueError(f"level must be 'image' or 'patch', got {level!r}.")
    label = int(getattr(bank, f"{level}_values")[index].argmax())
    image_index = int(index) if level == "image" else int(bank.patch_sources[index])
    known = 0 <= image_index < bank.image_keys.shape[0]
    return {
        "level": level,
        "index": int(index),
        "kind": "image" if level == "image" else ENTRY_KINDS[1 + label],
        "label": label,
        "source": image_sources(bank)[image_index] if known else _source_name(bank),
        "image_id": image_ids(bank)[image_index] if known else None,
        "image_index": image_index if known else -1,
    }


# ---------------------------------------------------------------------- select
def select_entries(
    bank: MemoryBank, image_indices: Sequence[int], patch_indices: Sequence[int], **metadata_updates
) -> MemoryBank:
    """A new bank with the given image and patch entries (in that order), provenance kept aligned.

    Every selected patch entry's image entry must be selected too (or the patch entry's source must be
    unknown, -1); otherwise a MemoryBankError names the orphan.
    """
    image_index = torch.as_tensor(list(image_indices), dtype=torch.long)
    patch_index = torch.as_tensor(list(patch_indices), dtype=torch.long)
    remap = torch.full((bank.image_keys.shape[0] + 1,), -1, dtype=torch.long)  # last slot maps -1 to -1
    remap[image_index] = torch.arange(len(image_index))
    old_sources = bank.patch_sources[patch_index]
    new_sources = remap[old_sources]
    orphans = (old_sources >= 0) & (new_sources < 0)
    if orphans.any():
        first = int(patch_index[orphans.nonzero()[0, 0]])
        raise MemoryBankError(
            f"Patch entry {first} would lose its image entry {int(bank.patch_sources[first])}; select both or neither."
        )
    ids, sources = image_ids(bank), image_sources(bank)
    metadata = dict(bank.metadata)
    chosen = image_index.tolist()
    metadata.update(image_ids=[ids[i] for i in chosen], image_sources=[sources[i] for i in chosen], **metadata_updates)
    hashes = _image_hashes(bank)
    if hashes is not None:
        metadata["image_sha256"] = [hashes[i] for i in chosen]
    return MemoryBank(
        image_keys=bank.image_keys[image_index].clone(),
        image_values=bank.image_values[image_index].clone(),
        patch_keys=bank.patch_keys[patch_index].clone(),
        patch_values=bank.patch_values[patch_index].clone(),
        patch_sources=new_sources,
        metadata=metadata,
    )


def _image_hashes(bank: MemoryBank) -> list[str | None] | None:
    """The bank's per-image-entry content hashes (`metadata["image_sha256"]`), or None when it has none."""
    hashes = bank.metadata.get("image_sha256")
    if isinstance(hashes, list) and len(hashes) == bank.image_keys.shape[0]:
        return hashes
    return None


# ---------------------------------------------------------------------- merge
def _backbone_of(bank: MemoryBank) -> dict[str, Any]:
    backbone = dict(bank.metadata.get("backbone") or {})
    backbone.setdefault("projection_dim", int(bank.image_keys.shape[1]))
    backbone.setdefault("hidden_size", int(bank.patch_keys.shape[1]))
    return backbone


def check_mergeable(
    first: MemoryBank, second: MemoryBank, names: tuple[str, str] = ("first bank", "second bank")
) -> None:
    """Raise MemoryBankError unless both banks were built with the same backbone and feature settings."""
    try:
        first.check_compatible(_backbone_of(second), second.metadata.get("features") or {}, strict=True)
    except MemoryBankError as error:
        raise MemoryBankError(
            f"Cannot merge {names[1]} into {names[0]}: {error} Rebuild one of them with the other's model "
            "(`mrad bank add` computes entries with a given model)."
        ) from error


def _source_name(bank: MemoryBank) -> str:
    return str(bank.metadata.get("source") or "unknown")


def merge_banks(
    banks: Sequence[MemoryBank],
    *,
    names: Sequence[str] | None = None,
    dedup_threshold: float | None = DEFAULT_DEDUP_THRESHOLD,
) -> MemoryBank:
    """Concatenate compatible banks (first bank's entries first), then de-duplicate (None: keep every entry).

    The result keeps the first bank's backbone and feature metadata; its `source` joins the distinct sources
    with "+", and `metadata["history"]` records the merge.
    """
    if not banks:
        raise MemoryBankError("merge_banks needs at least one bank.")
    names = list(names) if names is not None else [f"bank {i}" for i in range(len(banks))]
    for bank, name in zip(banks[1:], names[1:]):
        check_mergeable(banks[0], bank, (names[0], name))
    image_offset, patch_sources, ids, sources = 0, [], [], []
    for bank in banks:
        shifted = bank.patch_sources.clone()
        shifted[shifted >= 0] += image_offset
        patch_sources.append(shifted)
        ids += image_ids(bank)
        sources += image_sources(bank)
        image_offset += bank.image_keys.shape[0]
    distinct = list(dict.fromkeys(sources))
    metadata = dict(banks[0].metadata)
    hashes = [_image_hashes(b) for b in banks]
    if any(h is not None for h in hashes):  # per-image content hashes stay aligned with the entries
        metadata["image_sha256"] = [v for b, h in zip(banks, hashes) for v in (h or [None] * b.image_keys.shape[0])]
    metadata.update(
        image_ids=ids,
        image_sources=sources,
        source="+".join(distinct) if distinct else _source_name(banks[0]),
        history=list(metadata.get("history") or [])
        + [{"operation": "merge", "banks": [str(n) for n in names], "entries": [b.counts() for b in banks]}],
    )
    metadata.pop("calibration", None)  # thresholds chosen for one bank do not carry over to another
    merged = MemoryBank(
        image_keys=torch.cat([b.image_keys.float() for b in banks]),
        image_values=torch.cat([b.image_values.float() for b in banks]),
        patch_keys=torch.cat([b.patch_keys.float() for b in banks]),
        patch_values=torch.cat([b.patch_values.float() for b in banks]),
        patch_sources=torch.cat(patch_sources),
        metadata=metadata,
    )
    return merged if dedup_threshold is None else deduplicate(merged, dedup_threshold)


# ---------------------------------------------------------------------- de-duplication
def _greedy_keep(
    keys: torch.Tensor, labels: torch.Tensor, threshold: float, protected: torch.Tensor | None = None, block: int = 256
) -> list[int]:
    """Indices kept by the rule in the module docstring: in order, drop an entry whose same-label cosine with
    an already kept entry exceeds `threshold`, unless it is `protected` (protected entries are always kept)."""
    keys = l2_normalize(keys.float())
    count = keys.shape[0]
    protected = torch.zeros(count, dtype=torch.bool) if protected is None else protected
    kept: list[int] = []
    for start in range(0, count, block):
        chunk, chunk_labels = keys[start : start + block], labels[start : start + block]
        duplicate = torch.zeros(len(chunk), dtype=torch.bool)
        if kept:
            kept_index = torch.tensor(kept)
            similar = (chunk @ keys[kept_index].T > threshold) & (chunk_labels[:, None] == labels[kept_index][None])
            duplicate |= similar.any(dim=1)
        inner = (chunk @ chunk.T > threshold) & (chunk_labels[:, None] == chunk_labels[None])
        for offset in range(len(chunk)):
            if duplicate[offset] and not protected[start + offset]:
                continue
            kept.append(start + offset)
            later = inner[offset].clone()
            later[: offset + 1] = False
            duplicate |= later
    return kept


def deduplicate(
    bank: MemoryBank, threshold: float = DEFAULT_DEDUP_THRESHOLD, *, keep_leading: tuple[int, int] = (0, 0)
) -> MemoryBank:
    """Drop near-identical entries (same level, same label, cosine > threshold); the rule is in the module docstring.

    `keep_leading=(i, p)` always keeps the first i image and p patch entries (`add_samples` passes the existing
    bank's sizes, so adding images never removes what was there).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"The de-duplication threshold is a cosine similarity in (0, 1], got {threshold}.")
    leading_patches = torch.arange(bank.patch_keys.shape[0]) < keep_leading[1]
    patch_kept = _greedy_keep(bank.patch_keys, _labels(bank.patch_values), threshold, protected=leading_patches)
    has_region = torch.arange(bank.image_keys.shape[0]) < keep_leading[0]
    surviving_sources = (
        bank.patch_sources[torch.tensor(patch_kept, dtype=torch.long)]
        if patch_kept
        else torch.zeros(0, dtype=torch.long)
    )
    has_region[surviving_sources[surviving_sources >= 0]] = True
    image_kept = _greedy_keep(bank.image_keys, _labels(bank.image_values), threshold, protected=has_region)
    removed = {
        "image": bank.image_keys.shape[0] - len(image_kept),
        "patch": bank.patch_keys.shape[0] - len(patch_kept),
    }
    history = list(bank.metadata.get("history") or []) + [
        {"operation": "deduplicate", "threshold": threshold, "removed": removed}
    ]
    result = select_entries(bank, image_kept, patch_kept, history=history)
    if any(removed.values()):
        result.metadata.pop("calibration", None)  # thresholds were chosen with the entries just removed
    return result


# ---------------------------------------------------------------------- remove
def remove_sources(bank: MemoryBank, sources: Iterable[str]) -> MemoryBank:
    """Remove every entry whose source is in `sources` (image entries and the region prototypes built from them)."""
    sources = set(sources)
    entry_sources = image_sources(bank)
    present = set(entry_sources)
    unknown = sorted(sources - present)
    if unknown:
        raise MemoryBankError(f"The bank has no entries from {unknown}; its sources are {sorted(present)}.")
    image_kept = [i for i, source in enumerate(entry_sources) if source not in sources]
    if not image_kept:
        raise MemoryBankError(f"Removing {sorted(sources)} would leave the bank empty; build a new bank instead.")
    keep_image = torch.zeros(bank.image_keys.shape[0] + 1, dtype=torch.bool)  # last slot: unknown source (-1)
    keep_image[torch.tensor(image_kept)] = True
    keep_image[-1] = _source_name(bank) not in sources
    patch_kept = keep_image[bank.patch_sources].nonzero().flatten().tolist()
    if not patch_kept:
        raise MemoryBankError(
            f"Removing {sorted(sources)} would leave the pixel memory empty; build a new bank instead."
        )
    remaining = list(dict.fromkeys(entry_sources[i] for i in image_kept))
    history = list(bank.metadata.get("history") or []) + [{"operation": "remove", "sources": sorted(sources)}]
    metadata = {"source": "+".join(remaining), "history": history}
    result = select_entries(bank, image_kept, patch_kept, **metadata)
    result.metadata.pop("calibration", None)
    return result


# ---------------------------------------------------------------------- add
def samples_from_files(
    images: Sequence[str | os.PathLike[str]], label: str | int, masks: Sequence[str | os.PathLike[str]] | None = None
) -> tuple[list[dict[str, Any]], list[IgnoredFile]]:
    """Labelled samples (dicts for `build_memory_bank`) from image files and/or folders with one label.

    Masks are paired as the folder loader pairs them (`data.files.pair_image_files`: `--masks` by stem, then
    `<stem>_mask.png` beside the image); a mask file is never added as an image. Normal images never get a mask.
    Ids are the paths relative to the images' common folder (no absolute paths in a bank).

    Returns:
        The samples and the files that were not read (with the reason).
    """
    value = label_value(label, 0)
    if value == 0 and masks:
        raise ValueError("Normal images have no defect masks; drop --masks or use --label anomaly.")
    pairs, ignored = pair_image_files(images, masks)
    if not pairs:
        raise ValueError(f"No images found in {', '.join(map(str, images))}.")
    if value == 0:
        ignored += [IgnoredFile(mask, "mask of an image labelled normal") for _, mask in pairs if mask is not None]
        pairs = [(image, None) for image, _ in pairs]
    paths = [str(image) for image, _ in pairs]
    base = os.path.commonpath([os.path.abspath(os.path.dirname(path)) for path in paths])
    return [
        {
            "image": str(image),
            "label": value,
            "mask": None if mask is None else str(mask),
            "path": str(image),
            "id": Path(os.path.relpath(os.path.abspath(image), base)).as_posix(),
        }
        for image, mask in pairs
    ], ignored


def unmasked_anomalies(samples: Any) -> list[bool]:
    """Per sample: anomalous and without a mask (read from the columns of a loader dataset, nothing decoded)."""
    if hasattr(samples, "column_names"):  # a datasets.Dataset from data.loaders
        masks = (
            samples["mask_path"]
            if "mask_path" in samples.column_names
            else samples.cast_column("mask", _undecoded())["mask"]
        )
        return [int(label) == 1 and mask is None for label, mask in zip(samples["label"], masks)]
    flags = []
    for position, sample in enumerate(samples):
        if isinstance(sample, dict):
            label, mask = sample["label"], sample.get("mask")
        else:
            label, mask = sample[1], sample[2] if len(sample) == 3 else None
        flags.append(label_value(label, position) == 1 and mask is None)
    return flags


def _undecoded():
    from datasets import Image

    return Image(decode=False)


def entries_from_samples(
    model,
    samples: Iterable[Any],
    *,
    source: str,
    batch_size: int = 8,
    progress: bool = True,
    on_error: str = "fail",
    failures: list[dict[str, str]] | None = None,
) -> MemoryBank:
    """Memory entries for labelled samples, computed by `build_memory_bank(model, ..., attach=False)`.

    `samples` as for `build_memory_bank`: dicts with `image`, `label` and optional `mask` / `path` / `id`,
    or a `datasets.Dataset` from `mrad_hf.data.loaders`, whose files are read by MRAD's decoder
    (`data.reading.iter_readable_rows`: a corrupt file is named, and with `on_error="skip"` listed in
    `failures` and left out, never a raw PIL `OSError`). Every entry gets `source` as its provenance. An
    anomalous sample without a mask gets its image entry only: the region prototype the reference would
    build from its whole image (as if it were all normal) is dropped. `metadata["image_level_only"]` counts them.
    """
    if not source:
        raise ValueError(
            "Name the source of the new entries (e.g. 'line-3-defects'): it is how they are listed and removed later."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    unmasked: list[bool] = []
    if hasattr(samples, "column_names"):  # a loader dataset: decode through MRAD, note each readable row's flag
        from ..models.mrad.image_processing_mrad import MRADImageProcessor

        processor = MRADImageProcessor.from_config(model.config)
        readable = iter_readable_rows(samples, processor.load_pair, on_error=on_error, failures=failures)

        def rows():
            for row in readable:
                unmasked.append(int(row["label"]) == 1 and row["mask"] is None)
                yield row

        samples_in = CountedRows(rows(), len(samples))  # the progress bar's total
    else:
        samples_in = samples if isinstance(samples, (list, tuple)) else list(samples)
        unmasked = unmasked_anomalies(samples_in)
    with warnings.catch_warnings():  # the model's "whole image counts as a normal region" note: handled below
        warnings.filterwarnings("ignore", message=r".*had no mask.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="allow_no_anomalies")  # added entries may all be normal
        bank = build_memory_bank(
            model,
            samples_in,
            batch_size=batch_size,
            source=source,
            progress=progress,
            attach=False,
            allow_no_anomalies=True,
        )
    bank.metadata["image_sources"] = [source] * bank.image_keys.shape[0]
    if len(unmasked) == bank.image_keys.shape[0] and any(unmasked):
        flagged = torch.tensor(unmasked, dtype=torch.bool)
        keep = [j for j, image in enumerate(bank.patch_sources.tolist()) if image < 0 or not flagged[image]]
        bank = select_entries(bank, range(bank.image_keys.shape[0]), keep)
    bank.metadata["image_level_only"] = int(sum(unmasked))
    return bank


def add_samples(
    bank: MemoryBank,
    model,
    samples: Iterable[Any],
    *,
    source: str,
    dedup_threshold: float | None = DEFAULT_DEDUP_THRESHOLD,
    batch_size: int = 8,
    progress: bool = True,
    on_error: str = "fail",
    failures: list[dict[str, str]] | None = None,
) -> MemoryBank:
    """Append the entries of new labelled images to `bank` (no training). `model` must be the bank's backbone.

    `on_error` / `failures` as in `entries_from_samples` (unreadable files of a loader dataset).

    The history record of the addition counts the anomalous images without a mask
    (`image_level_only_anomalies`): they were added as image-level entries only (see `entries_from_samples`).
    """
    bank.check_compatible(model.backbone_fingerprint(), feature_settings(model.config), strict=True)
    if source in set(image_sources(bank)):
        raise MemoryBankError(
            f"The bank already has entries from source {source!r}; pick a new name, or remove that source first."
        )
    new = entries_from_samples(
        model, samples, source=source, batch_size=batch_size, progress=progress, on_error=on_error, failures=failures
    )
    image_level_only = new.metadata.pop("image_level_only", 0)
    merged = merge_banks([bank, new], names=[_source_name(bank), source], dedup_threshold=None)
    merged.metadata["history"][-1] = {
        "operation": "add",
        "source": source,
        "entries": new.counts(),
        "image_level_only_anomalies": image_level_only,
    }
    if dedup_threshold is None:
        return merged
    return deduplicate(merged, dedup_threshold, keep_leading=(bank.image_keys.shape[0], bank.patch_keys.shape[0]))


# ---------------------------------------------------------------------- info
def bank_info(bank: MemoryBank) -> dict[str, Any]:
    """Counts overall and per source, key widths, backbone and feature settings, history: JSON-able."""
    sources = image_sources(bank)
    image_labels = _labels(bank.image_values).tolist()
    patch_labels = _labels(bank.patch_values).tolist()
    per_source: dict[str, Counter] = {}
    for source, label in zip(sources, image_labels):
        per_source.setdefault(source, Counter())["anomalous images" if label else "normal images"] += 1
    for image_index, label in zip(bank.patch_sources.tolist(), patch_labels):
        source = sources[image_index] if image_index >= 0 else _source_name(bank)
        per_source.setdefault(source, Counter())["anomalous regions" if label else "normal regions"] += 1
    return {
        "source": bank.metadata.get("source"),
        "format_version": bank.metadata.get("format_version"),
        "counts": bank.counts(),
        "key_widths": {"image": int(bank.image_keys.shape[1]), "patch": int(bank.patch_keys.shape[1])},
        "per_source": {source: dict(counter) for source, counter in per_source.items()},
        "backbone": bank.metadata.get("backbone"),
        "random_backbone": bank.metadata.get("random_backbone"),  # built with randomly initialised CLIP weights
        "features": bank.metadata.get("features"),
        "calibration": bank.metadata.get("calibration"),
        "history": bank.metadata.get("history") or [],
    }
