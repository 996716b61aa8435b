# SPDX-License-Identifier: Apache-2.0
"""Paper-protocol evaluation: score a benchmark per category and write tables (paper Sec. 4.1).

Protocol (the official `test.py`): every test image is preprocessed by the model's processor (518 x 518,
masks resized bilinearly and binarised at 0.5), maps are the model's smoothed 518 x 518 maps, metrics are
computed per category and then averaged over categories (`metrics.compute_all_metrics`, reference AUPRO by
default). Results stream to disk: each finished category is written to `per_category/<name>.json` at once,
so a crash late in a run loses nothing, and a rerun with `resume=True` skips the finished categories.
Images and masks are read through MRAD's decoder (`data.loaders.iter_readable_rows`): with `on_error="skip"`
(the default) a file that cannot be used is listed under `skipped` in its category's record and in
`results.json` (`skipped_files`), and the other images are still scored; `on_error="fail"` stops instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.loaders import iter_readable_rows
from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..models.mrad.memory_bank_mrad import atomic_write
from ..tools.visualization import save_panel
from .metrics import METRIC_KEYS, compute_all_metrics, image_auroc, pixel_auroc

__all__ = ["evaluate_dataset", "format_markdown_table", "held_out_split", "held_out_aurocs"]


def held_out_split(rows: list[dict[str, Any]], seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out-images setting for random backbones: a seeded random half of `rows` is the memory (and the
    training set of the trained variants), the other half is scored."""
    order = np.random.default_rng(seed).permutation(len(rows))
    half = len(rows) // 2
    return [rows[i] for i in order[:half]], [rows[i] for i in order[half:]]


@torch.no_grad()
def held_out_aurocs(model, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of `model` (put in eval mode) on `rows` (image, label, mask), in one batch, with
    the maps and masks at the network input size."""
    processor = MRADImageProcessor.from_config(model.config)
    inputs = processor([row["image"] for row in rows], masks=[row["mask"] for row in rows])
    outputs = model.eval()(pixel_values=inputs["pixel_values"])
    return (
        image_auroc([row["label"] for row in rows], outputs.anomaly_score.numpy()),
        pixel_auroc(inputs["masks"].numpy() > 0.5, outputs.anomaly_map.numpy()),
    )


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _evenly_spaced(count: int, chosen: int) -> set[int]:
    if chosen <= 0 or count == 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, num=min(chosen, count)).round()}


@torch.no_grad()
def evaluate_category(
    model, rows, category: str, *, processor: MRADImageProcessor, batch_size: int, heatmap_dir: Path | None,
    heatmaps: int, aupro_protocol: str, progress,
) -> dict[str, Any]:
    """Score one category's rows and return its metrics, counts and throughput."""
    labels, scores, maps, masks = [], [], [], []
    if not rows:
        empty = {key: None for key in METRIC_KEYS}
        return {"category": category, "images": 0, "anomalous": 0, "seconds": 0.0, "images_per_second": float("nan"), "metrics": empty, "scores": []}
    shown = _evenly_spaced(len(rows), heatmaps)
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = processor([row["image"] for row in batch], masks=[row["mask"] for row in batch])
        outputs = model(pixel_values=inputs["pixel_values"].to(model.device, model.dtype))
        for offset, row in enumerate(batch):
            index = start + offset
            labels.append(int(row["label"]))
            scores.append(float(outputs.anomaly_score[offset]))
            maps.append(outputs.anomaly_map[offset].float().cpu().numpy())
            masks.append(inputs["masks"][offset].numpy() > 0.5)
            if heatmap_dir is not None and index in shown:
                image = processor.load(row["image"]).resize((maps[-1].shape[1], maps[-1].shape[0]))
                name = f"{category}_{index:04d}_{row['defect_type']}.png".replace("/", "_").replace(" ", "_")
                save_panel(heatmap_dir / name, image, maps[-1], mask=masks[-1], title=f"{category} {row['defect_type']} score={scores[-1]:.4f}", value_range=None)
        progress.update(len(batch))
    elapsed = time.perf_counter() - started
    has_masks = any(mask.any() for mask in masks)
    metrics = compute_all_metrics(
        labels, scores, np.stack(masks) if has_masks else None, np.stack(maps) if has_masks else None, aupro_protocol=aupro_protocol
    )
    return {
        "category": category,
        "images": len(rows),
        "anomalous": int(sum(labels)),
        "seconds": elapsed,
        "images_per_second": len(rows) / elapsed if elapsed > 0 else float("nan"),
        "metrics": {key: (None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)) for key, value in metrics.items()},
        "scores": [{"path": row["path"], "label": label, "score": score} for row, label, score in zip(rows, labels, scores)],
    }


def format_markdown_table(per_category: list[dict[str, Any]], mean: dict[str, float | None]) -> str:
    """Per-category rows and a mean row, metrics x 100 with one decimal (the papers' convention)."""
    header = ["category", *METRIC_KEYS, "images", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value):
        return "–" if value is None else f"{100 * value:.1f}"

    for result in per_category:
        values = [cell(result["metrics"].get(key)) for key in METRIC_KEYS]
        lines.append(f"| {result['category']} | " + " | ".join(values) + f" | {result['images']} | {result['images_per_second']:.2f} |")
    total = sum(r["images"] for r in per_category)
    seconds = sum(r["seconds"] for r in per_category)
    lines.append("| **mean** | " + " | ".join(cell(mean.get(key)) for key in METRIC_KEYS) + f" | {total} | {total / seconds if seconds else float('nan'):.2f} |")
    return "\n".join(lines) + "\n"


def evaluate_dataset(
    model,
    dataset,
    output_dir: str | Path,
    *,
    name: str = "dataset",
    batch_size: int = 8,
    heatmaps_per_category: int = 3,
    aupro_protocol: str = "reference",
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
    on_error: str = "skip",
) -> dict[str, Any]:
    """Evaluate `model` on every category of `dataset` (rows with image, mask, label, category, defect_type, path).

    Writes `per_category/<category>.json` as each category finishes, then `results.json`, `results.csv` and
    `results.md` (per-category rows and the mean over categories), plus heatmap panels under `heatmaps/`.
    Unreadable images or masks are skipped and listed (`on_error="skip"`) or stop the run (`"fail"`).
    Returns the content of `results.json`.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    processor = MRADImageProcessor.from_config(model.config)
    category_column = dataset["category"]
    categories = sorted(set(category_column))
    bar = tqdm(total=len(dataset), desc=f"Evaluating {name}", unit="img", disable=not progress)
    per_category = []
    for category in categories:
        record_path = output_dir / "per_category" / f"{category}.json"
        if resume and record_path.exists():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            bar.update(record["images"] + len(record.get("skipped", [])))
        else:
            # select by the category column so that only this category's images are decoded
            selected = dataset.select([i for i, name in enumerate(category_column) if name == category])
            skipped: list[dict[str, str]] = []
            rows = list(iter_readable_rows(selected, processor.load_pair, on_error=on_error, failures=skipped))
            bar.update(len(skipped))
            record = evaluate_category(
                model, rows, category, processor=processor, batch_size=batch_size,
                heatmap_dir=output_dir / "heatmaps", heatmaps=heatmaps_per_category, aupro_protocol=aupro_protocol, progress=bar,
            )
            record["skipped"] = skipped
            _write_text(record_path, json.dumps(record, indent=2))
        per_category.append(record)
    bar.close()
    mean = {}
    for key in METRIC_KEYS:
        values = [r["metrics"].get(key) for r in per_category if r["metrics"].get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    results = {
        "dataset": name,
        "protocol": {"aupro": aupro_protocol, "image_size": model.config.image_size, "mask_threshold": model.config.mask_threshold},
        "run": run_info or {},
        "mean": mean,
        "per_category": [{k: v for k, v in r.items() if k not in ("scores", "skipped")} for r in per_category],
        "skipped_files": [failure for r in per_category for failure in r.get("skipped", [])],
    }
    _write_text(output_dir / "results.json", json.dumps(results, indent=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", *METRIC_KEYS, "images", "images_per_second"])
    for r in per_category:
        writer.writerow([r["category"], *[r["metrics"].get(k) for k in METRIC_KEYS], r["images"], r["images_per_second"]])
    writer.writerow(["mean", *[mean[k] for k in METRIC_KEYS], sum(r["images"] for r in per_category), ""])
    _write_text(output_dir / "results.csv", buffer.getvalue())
    _write_text(output_dir / "results.md", format_markdown_table(per_category, mean))
    return results
