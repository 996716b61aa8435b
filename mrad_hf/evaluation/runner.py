# SPDX-License-Identifier: Apache-2.0
"""Paper-protocol evaluation: score a benchmark per category and write tables (paper Sec. 4.1).

Protocol (the official `test.py`): every test image is preprocessed by the model's processor (518 x 518,
masks resized bilinearly and binarised at 0.5), maps are the model's smoothed 518 x 518 maps, metrics are
computed per category and then averaged over categories (`metrics.compute_all_metrics`, reference AUPRO by
default). Results stream to disk: each finished category is written to `per_category/<name>.json` at once,
so a crash late in a run loses nothing, and a rerun with `resume=True` skips the finished categories.
Images and masks are read through MRAD's decoder (`data.reading.iter_readable_rows`): with `on_error="skip"`
(the default) a file that cannot be used is listed under `skipped` in its category's record and in
`results.json` (`skipped_files`), and the other images are still scored; `on_error="fail"` stops instead.

What the numbers mean, checked before scoring:

* A dataset whose images all carry one label has no defined metric: `evaluate_dataset` refuses it
  (`EvaluationDataError`) and says where normal (or anomalous) images must go.
* Anomalous images without a ground-truth mask are left out of the pixel metrics (never counted as all-normal
  pixels); each category reports how many (`pixel_excluded`, the "no mask" column of the table).
* Leakage: scored images that are also in the memory bank (same file content, by the bank metadata's
  `image_sha256`; for entries without a hash, the same id) score against themselves. They are counted and
  warned about (`BankOverlapWarning`, `results["bank_overlap"]`), and `exclude_bank_images=True` leaves them out.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.reading import undecoded_images
from ..memory.files import atomic_write, file_sha256
from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..tools.visualization import save_panel
from .metrics import METRIC_KEYS, compute_all_metrics, image_auroc, pixel_auroc
from .scoring import broadcast_from_main, iter_scored, process_group, score_items

__all__ = [
    "BankOverlapWarning",
    "EvaluationDataError",
    "bank_overlap",
    "evaluate_dataset",
    "file_sha256",
    "format_markdown_table",
    "held_out_aurocs",
    "held_out_split",
]


class EvaluationDataError(ValueError):
    """The dataset cannot give meaningful metrics (e.g. every image has the same label); the message says the fix."""


class BankOverlapWarning(UserWarning):
    """Some scored images are in the memory bank, so they are retrieved as their own nearest entry."""


def bank_overlap(dataset, bank_metadata: dict[str, Any] | None) -> tuple[list[int], str]:
    """Indices of the `dataset` rows whose image is in the bank described by `bank_metadata`, and how they matched.

    By content first: a row matches when the SHA-256 of its file is one of the bank's `image_sha256` values.
    Bank entries without a hash (older banks, in-memory images) match by id instead: the bank id equals the
    row's absolute `path`, or equals its relative `id` while the entry's source is the row's `dataset` name.
    """
    metadata = bank_metadata or {}
    ids = list(metadata.get("image_ids") or [])
    hashes = list(metadata.get("image_sha256") or [None] * len(ids))
    if len(hashes) != len(ids):
        hashes = hashes + [None] * (len(ids) - len(hashes)) if len(hashes) < len(ids) else hashes
    sources = list(metadata.get("image_sources") or [metadata.get("source")] * len(ids))
    known_hashes = {value for value in hashes if value}
    unhashed = [(entry, source) for entry, source, value in zip(ids, sources, hashes) if not value]
    by_path = {entry for entry, _ in unhashed}
    by_id = {(entry, str(source)) for entry, source in unhashed}
    if not known_hashes and not unhashed:
        return [], "none"
    columns = dataset.column_names
    paths = dataset["path"]
    row_ids = dataset["id"] if "id" in columns else [None] * len(paths)
    names = dataset["dataset"] if "dataset" in columns else [None] * len(paths)
    hits, how = [], set()
    for index, (path, row_id, name) in enumerate(zip(paths, row_ids, names)):
        if known_hashes and file_sha256(path) in known_hashes:
            hits.append(index)
            how.add("content (sha256)")
        elif path in by_path or (row_id is not None and (row_id, str(name)) in by_id):
            hits.append(index)
            how.add("id")
    return hits, " and ".join(sorted(how)) or ("content (sha256)" if known_hashes else "id")


def _check_both_labels(dataset, name: str) -> None:
    labels = {int(label) for label in dataset["label"]}
    if len(labels) > 1:
        return
    count = len(dataset)
    if labels == {1}:
        raise EvaluationDataError(
            f"{name}: all {count} images are labelled anomalous, so no metric is defined. Put the normal images in a "
            "folder named good/, normal/, nominal/ or ok/ (or pass --normal-dir DIR with --dataset folder)."
        )
    raise EvaluationDataError(
        f"{name}: all {count} images are labelled normal, so no metric is defined. Add defect images in <defect>/ "
        "folders beside good/ (or pass --abnormal-dir DIR with --dataset folder)."
    )


def _check_count(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


def held_out_split(rows: list[dict[str, Any]], seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out-images setting for random backbones: a seeded random half of `rows` is the memory (and the
    training set of the trained variants), the other half is scored."""
    order = np.random.default_rng(seed).permutation(len(rows))
    half = len(rows) // 2
    return [rows[i] for i in order[:half]], [rows[i] for i in order[half:]]


def held_out_aurocs(model, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of `model` (put in eval mode) on `rows` (image, label, mask), in one batch, with
    the maps and masks at the network input size."""
    items = [{"image": row["image"], "mask": row["mask"]} for row in rows]
    results = score_items(model, items, batch_size=max(1, len(rows)), on_error="fail")
    return (
        image_auroc([row["label"] for row in rows], np.array([result.score for result in results])),
        pixel_auroc(
            torch.stack([result.mask for result in results]).numpy() > 0.5,
            torch.stack([result.anomaly_map for result in results]).numpy(),
        ),
    )


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _evenly_spaced(count: int, chosen: int) -> set[int]:
    if chosen <= 0 or count == 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, num=min(chosen, count)).round()}


def evaluate_category(
    model,
    rows: list[dict[str, Any]],
    category: str,
    *,
    processor: MRADImageProcessor,
    batch_size: int,
    heatmap_dir: Path | None,
    heatmaps: int,
    aupro_protocol: str,
    progress,
    on_error: str = "skip",
    skipped: list[dict[str, str]] | None = None,
    num_workers: int = 0,
) -> dict[str, Any] | None:
    """Score one category's rows (image and mask undecoded, label, path, defect_type) with `scoring.iter_scored` and
    return its metrics, counts and throughput. Unreadable rows go to `skipped` (`on_error="skip"`) or raise. In a
    multi-process run every process scores its share and process 0 alone computes, draws and returns (others: None).
    """
    rank, _ = process_group()
    started = time.perf_counter()
    results = []
    for step in iter_scored(
        model,
        rows_as_items(rows),
        processor=processor,
        batch_size=batch_size,
        num_workers=num_workers,
        on_error=on_error,
    ):
        results.extend(step)
        progress.update(len(step))
    elapsed = time.perf_counter() - started
    if rank != 0:
        return None
    results.sort(key=lambda result: result.index)  # steps of several processes interleave
    failed = [result for result in results if result.error is not None]
    if skipped is not None:
        skipped.extend({"path": result.id, "error": result.error} for result in failed)
    scored = [result for result in results if result.error is None]
    if not scored:
        empty = {key: None for key in METRIC_KEYS}
        return {
            "category": category,
            "images": 0,
            "anomalous": 0,
            "pixel_excluded": 0,
            "seconds": 0.0,
            "images_per_second": float("nan"),
            "metrics": empty,
            "scores": [],
        }
    shown = _evenly_spaced(len(scored), heatmaps)
    labels, scores, maps, masks, known = [], [], [], [], []
    for index, result in enumerate(scored):
        row = rows[result.index]
        labels.append(int(row["label"]))
        scores.append(result.score)
        maps.append(result.anomaly_map.numpy())
        masks.append(result.mask.numpy() > 0.5)
        known.append(not (labels[-1] == 1 and row["mask"] is None))  # an anomaly without a mask: pixels unknown
        if heatmap_dir is not None and index in shown:
            image = processor.load(row["image"]).resize((maps[-1].shape[1], maps[-1].shape[0]))
            name = f"{category}_{index:04d}_{row['defect_type']}.png".replace("/", "_").replace(" ", "_")
            save_panel(
                heatmap_dir / name,
                image,
                maps[-1],
                mask=masks[-1],
                title=f"{category} {row['defect_type']} score={scores[-1]:.4f}",
                value_range=None,
            )
    has_masks = any(mask.any() for mask, is_known in zip(masks, known) if is_known)
    pixel_excluded = sum(1 for is_known in known if not is_known)
    metrics = compute_all_metrics(
        labels,
        scores,
        np.stack(masks) if has_masks else None,
        np.stack(maps) if has_masks else None,
        aupro_protocol=aupro_protocol,
        pixel_images=np.array(known, dtype=bool) if has_masks else None,
    )
    return {
        "category": category,
        "images": len(scored),
        "anomalous": int(sum(labels)),
        "pixel_excluded": pixel_excluded if has_masks else 0,
        "seconds": elapsed,
        "images_per_second": len(scored) / elapsed if elapsed > 0 else float("nan"),
        "metrics": {
            key: (None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value))
            for key, value in metrics.items()
        },
        "scores": [
            {"path": rows[result.index]["path"], "label": label, "score": score}
            for result, label, score in zip(scored, labels, scores)
        ],
    }


def rows_as_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dataset rows (image and mask undecoded) as `scoring` items: decoded in its DataLoader, named by their path."""
    return [
        {"image": row["image"], "mask": row.get("mask"), "label": int(row["label"]), "id": _row_name(row)}
        for row in rows
    ]


def _row_name(row: dict[str, Any]) -> str:
    image = row.get("image")
    return str(row.get("path") or (image.get("path") if isinstance(image, dict) else image))


def format_markdown_table(per_category: list[dict[str, Any]], mean: dict[str, float | None]) -> str:
    """Per-category rows and a mean row, metrics x 100 with one decimal (the papers' convention)."""
    excluded = sum(r.get("pixel_excluded", 0) for r in per_category)
    header = ["category", *METRIC_KEYS, "images", *(["no mask"] if excluded else []), "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value):
        return "–" if value is None else f"{100 * value:.1f}"

    def no_mask(count):
        return f" | {count}" if excluded else ""

    for result in per_category:
        values = [cell(result["metrics"].get(key)) for key in METRIC_KEYS]
        lines.append(
            f"| {result['category']} | "
            + " | ".join(values)
            + f" | {result['images']}{no_mask(result.get('pixel_excluded', 0))} | {result['images_per_second']:.2f} |"
        )
    total = sum(r["images"] for r in per_category)
    seconds = sum(r["seconds"] for r in per_category)
    lines.append(
        "| **mean** | "
        + " | ".join(cell(mean.get(key)) for key in METRIC_KEYS)
        + f" | {total}{no_mask(excluded)} | {total / seconds if seconds else float('nan'):.2f} |"
    )
    if excluded:
        lines.append("")
        lines.append(
            f'Pixel metrics leave out {excluded} anomalous image(s) without a ground-truth mask (column "no mask"); '
            "image metrics use every image."
        )
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
    exclude_bank_images: bool = False,
    overwrite: bool = False,
    resume_anyway: bool = False,
    num_workers: int = 0,
) -> dict[str, Any] | None:
    """Evaluate `model` on every category of `dataset` (rows with image, mask, label, category, defect_type, path).

    Writes `per_category/<category>.json` as each category finishes, then `results.json`, `results.csv` and
    `results.md` (per-category rows and the mean over categories), plus heatmap panels under `heatmaps/`.
    Unreadable images or masks are skipped and listed (`on_error="skip"`) or stop the run (`"fail"`).
    A dataset with one label only raises `EvaluationDataError`; scored images that are in the model's memory bank
    are counted (`results["bank_overlap"]`, a `BankOverlapWarning`) and, with `exclude_bank_images`, left out.
    The folder's run fingerprint (`tools.run_folder`: model, bank, dataset, settings) must match to resume; a folder
    of another run is refused unless `overwrite` (start over) or `resume_anyway`. Returns the content of `results.json`.

    Images are decoded in a DataLoader (`num_workers` processes) and scored by `scoring.iter_scored`. Under
    `torchrun` / `accelerate launch` (an initialised process group) every process scores its share of each category
    and process 0 alone writes the folder and returns the results (the others return None): the same numbers as one
    process.
    """
    from tqdm.auto import tqdm

    _check_count(batch_size, "batch_size", 1)
    _check_count(heatmaps_per_category, "heatmaps_per_category", 0)
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}.")
    if aupro_protocol not in ("reference", "anomalib"):
        raise ValueError(f"aupro_protocol must be 'reference' or 'anomalib', got {aupro_protocol!r}.")
    _check_both_labels(dataset, name)
    hits, matched_by = bank_overlap(dataset, model.memory_bank_metadata)
    overlap = {
        "images": len(hits),
        "of": len(dataset),
        "matched_by": matched_by if hits else None,
        "excluded": bool(exclude_bank_images and hits),
    }
    if hits and exclude_bank_images:
        hit_set = set(hits)
        dataset = dataset.select([index for index in range(len(dataset)) if index not in hit_set])
        overlap["message"] = (
            f"Left out {len(hits)} of {overlap['of']} scored images that are in the memory bank (same {matched_by}); {len(dataset)} remain."
        )
        if not len(dataset):
            raise EvaluationDataError(
                f"{name}: every scored image is in the memory bank; score a different dataset or build the bank from other images."
            )
        _check_both_labels(dataset, name)
    elif hits:
        overlap["message"] = (
            f"LEAKAGE: {len(hits)} of {len(dataset)} scored images are in the memory bank (same {matched_by}); each is retrieved as "
            "its own nearest entry, so the metrics are optimistic. Pass --exclude-bank-images (exclude_bank_images=True) to leave them out."
        )
    if "message" in overlap:
        warnings.warn(overlap["message"], BankOverlapWarning, stacklevel=2)
    from ..tools import run_folder

    output_dir = Path(output_dir)
    settings = {
        "aupro": aupro_protocol,
        "batch_size": batch_size,
        "dtype": str(model.dtype),
        "exclude_bank_images": exclude_bank_images,
    }
    fingerprint = run_folder.run_fingerprint(
        command="evaluate", model=model, dataset=run_folder.dataset_identity(dataset, name=name), settings=settings
    )
    rank, _ = process_group()
    run, refusal = None, None
    if rank == 0:  # one process owns the folder; the others learn its state (or its refusal) from it
        try:
            run = run_folder.open_run_folder(
                output_dir,
                fingerprint,
                artefacts=("per_category", "heatmaps", "results.json", "results.csv", "results.md"),
                overwrite=overwrite or not resume,
                resume_anyway=resume_anyway,
            )
        except Exception as error:
            refusal = error
    category_column = dataset["category"]
    categories = sorted(set(category_column))
    finished = [
        category for category in categories if resume and (output_dir / "per_category" / f"{category}.json").exists()
    ]
    refusal, finished = broadcast_from_main((refusal, finished) if rank == 0 else None)
    if refusal is not None:
        raise refusal
    processor = MRADImageProcessor.from_config(model.config)
    bar = tqdm(total=len(dataset), desc=f"Evaluating {name}", unit="img", disable=not progress or rank != 0)
    per_category = []
    for category in categories:
        record_path = output_dir / "per_category" / f"{category}.json"
        if category in finished:
            if rank != 0:
                continue
            record = json.loads(record_path.read_text(encoding="utf-8"))
            bar.update(record["images"] + len(record.get("skipped", [])))
        else:
            # select by the category column so that only this category's images are decoded (in the DataLoader)
            selected = undecoded_images(
                dataset.select([i for i, name in enumerate(category_column) if name == category])
            )
            skipped: list[dict[str, str]] = []
            record = evaluate_category(
                model,
                list(selected),
                category,
                processor=processor,
                batch_size=batch_size,
                heatmap_dir=output_dir / "heatmaps",
                heatmaps=heatmaps_per_category,
                aupro_protocol=aupro_protocol,
                progress=bar,
                on_error=on_error,
                skipped=skipped,
                num_workers=num_workers,
            )
            if record is None:  # not process 0
                continue
            record["skipped"] = skipped
            _write_text(record_path, json.dumps(record, indent=2))
        per_category.append(record)
    bar.close()
    if rank != 0:
        return None
    mean = {}
    for key in METRIC_KEYS:
        values = [r["metrics"].get(key) for r in per_category if r["metrics"].get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    results = {
        "dataset": name,
        "protocol": {
            "aupro": aupro_protocol,
            "image_size": model.config.image_size,
            "mask_threshold": model.config.mask_threshold,
        },
        "run": run_info or {},
        "mean": mean,
        "per_category": [{k: v for k, v in r.items() if k not in ("scores", "skipped")} for r in per_category],
        "skipped_files": [failure for r in per_category for failure in r.get("skipped", [])],
        "pixel_excluded_images": sum(r.get("pixel_excluded", 0) for r in per_category),
        "bank_overlap": overlap,
    }
    _write_text(output_dir / "results.json", json.dumps(results, indent=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", *METRIC_KEYS, "images", "pixel_excluded", "images_per_second"])
    for r in per_category:
        writer.writerow(
            [
                r["category"],
                *[r["metrics"].get(k) for k in METRIC_KEYS],
                r["images"],
                r.get("pixel_excluded", 0),
                r["images_per_second"],
            ]
        )
    writer.writerow(
        [
            "mean",
            *[mean[k] for k in METRIC_KEYS],
            sum(r["images"] for r in per_category),
            results["pixel_excluded_images"],
            "",
        ]
    )
    _write_text(output_dir / "results.csv", buffer.getvalue())
    _write_text(output_dir / "results.md", format_markdown_table(per_category, mean))
    run.finish()
    return results
