# SPDX-License-Identifier: Apache-2.0
"""Building MRAD's two-level memory from labelled auxiliary images, as the reference `build_*cache_model` does
(paper Sec. 3.2): per image its class key, and up to two region prototypes (anomalous and normal patches)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..models.mrad.features_mrad import neighbor_average
from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..models.mrad.memory_bank_mrad import MemoryBank, MemoryBankError, feature_settings
from ..models.mrad.retrieval_mrad import l2_normalize, one_hot_labels
from .samples import batched, iter_samples, progress_bar

__all__ = ["CountedRows", "build_memory_bank", "patch_region_labels", "random_backbone"]


def patch_region_labels(masks: torch.Tensor, grid_size: int, rule: str = "exact") -> torch.Tensor:
    """Label the G x G patch grid from (B, S, S) binary masks -> (B, G*G) int64: 1 anomalous, 0 normal, -1 dropped.

    "exact" (reference): bilinear (align_corners=False) downsampling; anomalous where the value is exactly 1, normal
    where exactly 0, fractional boundary patches dropped. "majority": anomalous where > 0.5, else normal.
    """
    small = F.interpolate(
        masks.float().unsqueeze(1), size=(grid_size, grid_size), mode="bilinear", align_corners=False
    )
    small = small.squeeze(1).flatten(1)
    if rule == "exact":
        labels = torch.full_like(small, -1, dtype=torch.long)
        labels[small == 1] = 1
        labels[small == 0] = 0
        return labels
    if rule == "majority":
        return (small > 0.5).long()
    raise ValueError(f"Unknown region rule {rule!r}; use 'exact' or 'majority'.")


class CountedRows:
    """Rows read as they come (e.g. `data.reading.iter_readable_rows`) with their dataset's length, so that the
    progress bar of `build_memory_bank` has a total; an unreadable row is skipped, so the bar may stop short."""

    def __init__(self, rows: Iterable[Any], count: int):
        self.rows, self.count = rows, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.rows)


def random_backbone(model) -> str | None:
    """The name of `model`'s randomly initialised CLIP backbone (e.g. "random-small"), or None when none is known.

    Whoever initialises a backbone at random says so (`model.random_backbone`, set by the CLI's `--clip random-*`);
    every bank built from such a model records it (`metadata["random_backbone"]`), so a saved model, its banks and
    every later command keep knowing that its scores say nothing about MRAD's accuracy."""
    return getattr(model, "random_backbone", None) or (getattr(model, "memory_bank_metadata", None) or {}).get(
        "random_backbone"
    )


@torch.no_grad()
def build_memory_bank(
    model,
    samples: Iterable[Any],
    *,
    batch_size: int = 8,
    source: str | None = None,
    image_processor: MRADImageProcessor | None = None,
    progress: bool = True,
    attach: bool = True,
    accelerator: Any = None,
    allow_no_anomalies: bool = False,
) -> MemoryBank:
    """Build both memories of `model` (an `MRADForAnomalyDetection`) from labelled auxiliary samples.

    Args:
        samples: an iterable (a list, a `datasets.Dataset`, a generator) of dicts with `image`, `label`
            (0/1 or "normal"/"anomaly"), optional `mask` (None for good images) and optional `path`/`id`;
            or tuples `(image, label[, mask])`. Images and masks may be paths, PIL images or arrays.
        batch_size: images per forward pass (the result does not depend on it).
        source: a name for the auxiliary data (e.g. "visa"), stored in the bank's metadata.
        image_processor: defaults to `MRADImageProcessor.from_config(model.config)`.
        progress: show a tqdm progress bar.
        attach: also attach the bank to the model (`model.set_memory_bank`).
        accelerator: an `accelerate.Accelerator` of a multi-process run: batch k is computed by process
            k % num_processes and the entries are gathered in the original order, so every process gets the
            bank a single process builds (batches have the same composition either way).
        allow_no_anomalies: build a bank without anomalous entries at the image or pixel level (a warning says
            what the scores then mean) instead of refusing it.

    Returns:
        The `MemoryBank`. Each image adds its class key (label = its image label) and up to two region
        prototypes: the mean neighbour-averaged V-V token over its anomalous patches (label 1) and over its
        normal patches (label 0), each L2-normalised. With the default `region_rule="exact"`, a patch is
        anomalous only if the mask downsampled bilinearly to the grid is exactly 1, normal only if exactly 0.
    """
    processor = image_processor or MRADImageProcessor.from_config(model.config)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    total = len(samples) if hasattr(samples, "__len__") else None
    if total is not None and world > 1:
        total = sum(min(batch_size, total - start) for start in range(rank * batch_size, total, world * batch_size))
    bar = progress_bar(total, "Building memory bank" + (f" (process {rank})" if world > 1 else ""), progress)
    batches = []
    for batch_index, batch in enumerate(batched(iter_samples(samples), batch_size)):
        if batch_index % world != rank:
            continue
        batches.append((batch_index, _memory_entries(model, batch, processor)))
        bar.update(len(batch))
    bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world  # the accelerator's process group (gloo on CPU, nccl on GPU)
        torch.distributed.all_gather_object(gathered, batches)
        batches = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    entries = [entry for _, batch_entries in batches for entry in batch_entries]
    bank = _assemble_memory_bank(model, entries, source)
    _check_anomalous_entries(bank, allow_no_anomalies)
    if attach:
        model.set_memory_bank(bank)
    return bank


def _memory_entries(model, batch: list[tuple[Any, int, Any, dict]], processor) -> list[dict[str, Any]]:
    """Per image of one batch: its provenance, label, class key and [(region label, prototype)] (anomalous first)."""
    images, labels, masks, ids = zip(*batch)
    inputs = processor(list(images), masks=list(masks))
    features = model.extract_features(inputs["pixel_values"].to(device=model.device, dtype=model.dtype))
    keys = l2_normalize(features.class_embeds.float()).cpu()
    patch_tokens = neighbor_average(
        features.patch_tokens.float(), features.grid_size, model.config.neighbor_kernel_sizes
    )
    regions = patch_region_labels(inputs["masks"].to(model.device), features.grid_size, model.config.region_rule)
    entries = []
    for offset in range(len(images)):
        prototypes = []
        for region_label in (1, 0):  # the reference appends the anomalous prototype first
            selected = regions[offset] == region_label
            if selected.any():
                prototypes.append((region_label, l2_normalize(patch_tokens[offset][selected].mean(dim=0)).cpu()))
        entries.append(
            {
                "id": ids[offset],
                "label": labels[offset],
                "key": keys[offset],
                "regions": prototypes,
                "unmasked_anomaly": labels[offset] == 1 and masks[offset] is None,
            }
        )
    return entries


def _assemble_memory_bank(model, entries: list[dict[str, Any]], source: str | None) -> MemoryBank:
    if not entries:
        raise MemoryBankError("No samples were given to build_memory_bank; pass at least one labelled image.")
    unmasked_anomalies = sum(entry["unmasked_anomaly"] for entry in entries)
    if unmasked_anomalies:
        warnings.warn(
            f"{unmasked_anomalies} anomalous sample(s) had no mask: as in the reference, their whole image counts as "
            "a normal region for the pixel memory. Pass masks to use them as anomalous regions.",
            stacklevel=3,
        )
    regions = [(label, key, index) for index, entry in enumerate(entries) for label, key in entry["regions"]]
    return MemoryBank(
        image_keys=torch.stack([entry["key"] for entry in entries]),
        image_values=one_hot_labels(torch.tensor([entry["label"] for entry in entries])),
        patch_keys=torch.stack([key for _, key, _ in regions])
        if regions
        else torch.zeros(0, model.config.patch_key_dim),
        patch_values=one_hot_labels(torch.tensor([label for label, _, _ in regions]))
        if regions
        else torch.zeros(0, 2),
        patch_sources=torch.tensor([index for _, _, index in regions], dtype=torch.long),
        metadata={
            "source": source,
            "backbone": model.backbone_fingerprint(),
            "features": feature_settings(model.config),
            "image_ids": [entry["id"]["id"] for entry in entries],
            "image_sources": [entry["id"]["source"] or source or "unknown" for entry in entries],
            "image_sha256": [entry["id"]["sha256"] for entry in entries],
            **({"random_backbone": name} if (name := random_backbone(model)) else {}),
        },
    )


def _check_anomalous_entries(bank: MemoryBank, allowed: bool) -> None:
    counts = bank.counts()
    missing = [level for level in ("image", "patch") if not counts[f"{level}_anomalous"]]
    if not missing:
        return
    levels = " and ".join("pixel" if level == "patch" else level for level in missing)
    if not allowed:
        raise MemoryBankError(
            f"The memory bank would have no anomalous entry at the {levels} level ({counts['image_entries']} images, "
            f"{counts['image_anomalous']} anomalous, {counts['patch_anomalous']} anomalous regions): every score would be "
            "0. MRAD retrieves from labelled auxiliary images, normal AND defective: add defect images with label 1 "
            "and their masks (e.g. the test split of a dataset), or pass allow_no_anomalies=True to build it anyway."
        )
    warnings.warn(
        f"allow_no_anomalies=True: the bank has no anomalous entry at the {levels} level, so retrieval there returns "
        "p_anomaly = 0 for every query and the scores only reflect the other level.",
        stacklevel=3,
    )
