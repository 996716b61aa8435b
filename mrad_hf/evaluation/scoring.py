# SPDX-License-Identifier: Apache-2.0
"""The one batched-scoring loop: images in, per-item maps and scores out (paper Sec. 3.3 inference, at throughput).

`score_items(model, items)` is what evaluation, calibration and prediction call:

* **decode and preprocess in a `torch.utils.data.DataLoader`** (`num_workers` processes decode and resize the next
  batches while the model computes the current one); every item is decoded on its own, so a bad file is that
  item's failure: `on_error="skip"` records it (`ScoredItem.error`, one line naming the file) and scores the rest,
  `on_error="fail"` raises `MRADInputError` naming the file;
* **batches on a device and dtype**: `device` moves the model, `dtype` ("float32", "bfloat16", "float16", "auto")
  runs the CLIP tower in that dtype (`runtime.set_backbone_dtype`, `mode="cast"` or `"autocast"`); bank,
  retrieval, maps and scores stay float32;
* **several processes** (`accelerate launch` / `torchrun`): with an `accelerate.Accelerator` (or any initialised
  `torch.distributed` group) the *batches* are split between the processes (`split_between_processes`) and the
  results gathered in input order, so every process returns what one process computes (the same batches, so the
  same numbers; bit-identical with `config.batch_invariant=True`).

Results come back in input order as `ScoredItem`s (score, image-level probability, the input-size map, the processed
ground-truth mask if one was given, the original size, the label if one was given). The glibc allocator is tuned for
batch activations first (`runtime.tune_malloc_for_inference`; `tune_malloc=False` to skip).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..memory.samples import label_value, progress_bar
from ..models.mrad.image_processing_mrad import MRADImageProcessor, MRADInputError
from ..runtime import set_backbone_dtype, tune_malloc_for_inference

__all__ = [
    "ScoredItem",
    "score_items",
    "iter_scored",
    "process_group",
    "init_distributed",
    "broadcast_from_main",
    "ON_ERROR_CHOICES",
]

ON_ERROR_CHOICES = ("skip", "fail")


@dataclass
class ScoredItem:
    """One input's result. `error` is set (and the numbers are None) when the item could not be used."""

    index: int
    id: str
    score: float | None = None
    image_probability: float | None = None
    anomaly_map: torch.Tensor | None = None  # (S, S) float32 on the CPU, at the network input size
    mask: torch.Tensor | None = None  # (S, S) 0/1 ground truth at the input size, when the item had a mask
    original_size: tuple[int, int] | None = None  # (height, width) of the decoded image
    label: int | None = None
    error: str | None = None
    image: Any = None  # the decoded PIL image, with `keep_images=True`


def _normalise(item: Any, position: int) -> dict[str, Any]:
    """A path / PIL image / array, or a dict with `image` and optional `label`, `mask`, `id`/`path`."""
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"Item {position} needs an 'image' key, got {sorted(item)}.")
        image, mask = item["image"], item.get("mask")
        label = item.get("label")
        item_id = item.get("id") or item.get("path")
        label = None if label is None else label_value(label, position)
    else:
        image, mask, label, item_id = item, None, None, None
    if item_id is None:
        item_id = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"item-{position}"
    has_mask = isinstance(item, dict) and "mask" in item
    return {"image": image, "mask": mask, "label": label, "id": str(item_id), "has_mask": has_mask}


class _ScoringDataset(Dataset):
    """Decodes and preprocesses one item per `__getitem__` (run in the DataLoader's workers)."""

    def __init__(
        self,
        items: list[dict[str, Any]],
        indices: list[int],
        processor: MRADImageProcessor,
        with_masks: bool,
        keep_images: bool = False,
    ):
        self.items, self.indices, self.processor, self.with_masks = items, indices, processor, with_masks
        self.keep_images = keep_images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item = self.items[index]
        try:
            image = self.processor.load(item["image"]) if self.keep_images else item["image"]
            inputs = self.processor([image], masks=[item["mask"]] if self.with_masks else None)
        except Exception as error:  # the processor raises MRADInputError naming the file; anything else: same
            if isinstance(error, MRADInputError):
                message = str(error).splitlines()[0]
            else:  # memory, disk, a decoder bug: this item's failure too
                detail = (str(error).splitlines() or ["out of memory" if isinstance(error, MemoryError) else ""])[0]
                message = f"Image '{item['id']}' failed: {type(error).__name__}: {detail}"
            return {"index": index, "error": message}
        return {
            "index": index,
            "pixel_values": inputs["pixel_values"][0],
            "mask": inputs["masks"][0] if self.with_masks else None,
            "original_size": tuple(int(v) for v in inputs["original_sizes"][0]),
            "image": image if self.keep_images else None,
        }


_OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


def _forward(model, pixel_values: torch.Tensor, device, keep_maps: bool):
    """One batched forward -> (scores, p_anomaly, maps or None, {offset: error}) on the CPU.

    Out of memory for the batch (host `MemoryError` or CUDA's `OutOfMemoryError`): the batch is scored image by image,
    so only an image that does not fit alone fails (with a one-line error; zeros stand in its rows), and the run goes
    on, at any batch size.
    """
    try:
        outputs = model(pixel_values=pixel_values.to(device, non_blocking=True))
        maps = outputs.anomaly_map.float().cpu() if keep_maps else None
        return outputs.anomaly_score.float().cpu(), outputs.image_probabilities[:, 1].float().cpu(), maps, {}
    except _OUT_OF_MEMORY as error:
        if pixel_values.shape[0] == 1:
            blank_map = torch.zeros(1, *pixel_values.shape[-2:]) if keep_maps else None
            return torch.zeros(1), torch.zeros(1), blank_map, {0: f"out of memory even alone ({type(error).__name__})"}
    parts = [
        _forward(model, pixel_values[offset : offset + 1], device, keep_maps) for offset in range(len(pixel_values))
    ]
    failures = {offset: part[3][0] for offset, part in enumerate(parts) if part[3]}
    maps = torch.cat([part[2] for part in parts]) if keep_maps else None
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), maps, failures


def _collate(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = [record for record in records if "error" not in record]
    return {
        "errors": [(record["index"], record["error"]) for record in records if "error" in record],
        "indices": [record["index"] for record in good],
        "pixel_values": torch.stack([record["pixel_values"] for record in good]) if good else None,
        "masks": [record["mask"] for record in good],
        "original_sizes": [record["original_size"] for record in good],
        "images": [record["image"] for record in good],
    }


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads


def process_group(accelerator: Any = None) -> tuple[int, int]:
    """(rank, number of processes) of this run: the accelerator's, an initialised `torch.distributed` group's, or (0, 1)."""
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment (`WORLD_SIZE` > 1),
    with the gloo backend (results are gathered as Python objects, on the CPU, whatever device the model uses);
    returns (rank, number of processes), (0, 1) for a plain run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_available():
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo")
    return process_group()


def broadcast_from_main(value: Any) -> Any:
    """`value` as process 0 has it, on every process (itself on a single process)."""
    if process_group()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _my_batches(num_batches: int, accelerator: Any, rank: int, world: int) -> list[int]:
    batches = list(range(num_batches))
    if world == 1 or num_batches == 0:
        return batches
    if accelerator is not None:
        with accelerator.split_between_processes(batches) as mine:
            return list(mine)
    per_process, extra = divmod(num_batches, world)  # the same contiguous split as accelerate's
    start = rank * per_process + min(rank, extra)
    return batches[start : start + per_process + (1 if rank < extra else 0)]


def score_items(model, items: Iterable[Any], **options: Any) -> list[ScoredItem]:
    """Score `items` with an MRAD model in batches; results in input order, one `ScoredItem` per item (on every
    process of a multi-process run). The options are `iter_scored`'s."""
    return sorted((item for step in iter_scored(model, items, **options) for item in step), key=lambda r: r.index)


@torch.no_grad()
def iter_scored(
    model,
    items: Iterable[Any],
    *,
    processor: MRADImageProcessor | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    dtype_mode: str = "cast",
    on_error: str = "skip",
    keep_maps: bool = True,
    keep_images: bool = False,
    accelerator: Any = None,
    progress: bool = False,
    tune_malloc: bool = True,
) -> Iterator[list[ScoredItem]]:
    """Score `items` in batches and yield, step by step, the `ScoredItem`s of that step in input order (one batch;
    with several processes one batch of each, gathered on every process), so callers can write results as they come.

    Args:
        model: an `MRADForAnomalyDetection` with a memory bank (put in eval mode here).
        items: paths, PIL images or arrays, or dicts with `image` and optional `mask` (None for a good image),
            `label` (0/1 or "normal"/"anomaly"), `id`/`path`. When any dict has a `mask` key, ground-truth masks are
            preprocessed too (`ScoredItem.mask`).
        processor: defaults to `MRADImageProcessor.from_config(model.config)`.
        batch_size: images per forward pass (>= 1). With `config.batch_invariant=False` (default) the numbers agree
            across batch sizes within float rounding; with True bit for bit.
        num_workers: DataLoader worker processes decoding ahead of the model (0: decode in this process).
        device: where to run (the model is moved there); default: where the model is.
        dtype: the CLIP tower's dtype ("auto" = `runtime.resolve_dtype`); None leaves the model as it is.
        dtype_mode: "cast" (cast the tower's weights) or "autocast" (float32 weights under `torch.autocast`).
        on_error: "skip" (record the item's one-line error, score the rest) or "fail" (raise `MRADInputError`, on
            every process).
        keep_maps: keep each item's (S, S) map (1 MiB per 518-px image); False keeps scores only.
        keep_images: keep each item's decoded PIL image (`ScoredItem.image`, e.g. for heatmap panels).
        accelerator: an `accelerate.Accelerator` of a multi-process run (also detected from an initialised
            `torch.distributed` group): batches are split between processes, results gathered on every process.
        progress: a tqdm bar.
        tune_malloc: apply `runtime.tune_malloc_for_inference()` (Linux/glibc) before scoring.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if tune_malloc:
        tune_malloc_for_inference()
    if device is not None:
        model.to(device)
    if dtype is not None:
        set_backbone_dtype(model, dtype, mode=dtype_mode)
    model.eval()
    run_device = next(model.clip.parameters()).device
    processor = processor or MRADImageProcessor.from_config(model.config)
    raw = list(items)
    normalised = [_normalise(item, position) for position, item in enumerate(raw)]
    with_masks = any(item["has_mask"] for item in normalised)
    rank, world = process_group(accelerator)

    batch_starts = list(range(0, len(normalised), batch_size))
    mine = _my_batches(len(batch_starts), accelerator, rank, world)
    indices = [
        index
        for batch in mine
        for index in range(batch_starts[batch], min(batch_starts[batch] + batch_size, len(normalised)))
    ]
    loader = DataLoader(
        _ScoringDataset(normalised, indices, processor, with_masks, keep_images),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=run_device.type == "cuda",
        persistent_workers=False,
    )
    steps = -(-len(batch_starts) // world)  # the most batches any process has (accelerate's contiguous split)
    batches = iter(loader)
    bar = progress_bar(len(indices), "Scoring" + (f" (process {rank})" if world > 1 else ""), progress)
    for _ in range(steps):
        batch = next(batches, None)
        step: list[ScoredItem] = []
        if batch is not None:
            for index, message in batch["errors"]:
                item = normalised[index]
                step.append(ScoredItem(index=index, id=item["id"], label=item["label"], error=message))
            if batch["pixel_values"] is not None:
                scores, probabilities, maps, failures = _forward(model, batch["pixel_values"], run_device, keep_maps)
                for offset, index in enumerate(batch["indices"]):
                    item = normalised[index]
                    if offset in failures:
                        error = f"Image '{item['id']}' failed: {failures[offset]}"
                        step.append(ScoredItem(index=index, id=item["id"], label=item["label"], error=error))
                        continue
                    step.append(
                        ScoredItem(
                            index=index,
                            id=item["id"],
                            score=float(scores[offset]),
                            image_probability=float(probabilities[offset]),
                            anomaly_map=maps[offset].clone() if maps is not None else None,
                            mask=batch["masks"][offset],
                            original_size=batch["original_sizes"][offset],
                            label=item["label"],
                            image=batch["images"][offset],
                        )
                    )
            bar.update(len(batch["indices"]) + len(batch["errors"]))
        if world > 1:  # every process takes part in every step, so a failure on one is raised on all
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, step)
            step = [item for part in gathered for item in part]
        step.sort(key=lambda item: item.index)
        failed = [item for item in step if item.error is not None]
        if failed and on_error == "fail":
            bar.close()
            raise MRADInputError(failed[0].error)
        yield step
    bar.close()
