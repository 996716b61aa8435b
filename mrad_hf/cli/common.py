# SPDX-License-Identifier: Apache-2.0
"""What every `mrad` command shares: loading a detector (saved model, CLIP checkpoint or random backbone), the
user-facing error type, logging, JSON output, image collection and the bank-building step."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CLIError", "RANDOM_BACKBONES", "load_detector"]

#: Randomly initialised CLIP shapes for offline runs, where no pretrained weights can be downloaded.
RANDOM_BACKBONES: dict[str, dict] = {
    "random-tiny": dict(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=112, patch_size=14),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32,
    ),
    "random-small": dict(
        vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=14),
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=128,
    ),
    "random-vit-l14-336": dict(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
}
#: With random weights all patch features are nearly collinear, so softmax retrieval at the reference's
#: temperature 1.0 is almost uniform and the offline demo would show noise; it uses this sharper one instead
#: (only for random backbones, and it says so). Real CLIP weights use the reference's 1.0.
RANDOM_DEMO_TEMPERATURE = 0.01
RANDOM_WARNING = (
    "NOTE: using a RANDOMLY INITIALISED CLIP backbone ({name}). No pretrained CLIP weights can be downloaded on this "
    "machine, so the scores below show that the pipeline runs end to end, not MRAD's accuracy. For real results pass "
    "--clip openai/clip-vit-large-patch14-336 (or a local folder with that checkpoint)."
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _log(message: str) -> None:
    print(message, flush=True)


def load_detector(model: str | None = None, clip: str | None = None, *, image_size: int | None = None, seed: int = 0, dtype: str | None = None, **overrides):
    """An MRAD model from an MRAD folder / Hub id (`model`) or a CLIP source (`clip`, or a `random-*` name).

    `overrides` are MRADConfig fields for a new model (ignored when loading a saved one would change it).
    `dtype` ("bfloat16", "float16") runs the CLIP tower in half precision (`features_mrad.set_backbone_dtype`).
    """
    detector = _load_detector(model, clip, image_size=image_size, seed=seed, **overrides)
    return _set_dtype(detector, dtype)


def _set_dtype(detector, dtype: str | None):
    from ..models.mrad.features_mrad import set_backbone_dtype

    if dtype and dtype != "float32":
        _log(f"CLIP tower in {dtype}; memory bank, retrieval and scores stay float32 (opt-in; slower than float32 on CPUs without bf16 matrix units)")
    return set_backbone_dtype(detector, dtype)


def _load_detector(model: str | None, clip: str | None, *, image_size: int | None, seed: int, **overrides):
    import torch
    from transformers import CLIPConfig

    from ..models.mrad.memory_bank_mrad import verify_model_memory
    from ..models.mrad.modeling_mrad import MRADForAnomalyDetection

    overrides = {key: value for key, value in overrides.items() if value is not None}
    if image_size is not None:
        overrides["image_size"] = image_size
    if model:
        from ..hub.api import load_model

        detector = load_model(model)
        verify_model_memory(detector)  # config and weights from the same save, bank built for this backbone
        if image_size is not None and image_size != detector.config.image_size:
            raise CLIError(f"--image-size {image_size} differs from the saved model's {detector.config.image_size}.")
        _log(f"Loaded MRAD model from {model} (bank: {detector.config.image_bank_size} image / {detector.config.patch_bank_size} patch entries)")
        return detector
    if not clip:
        raise CLIError("Pass --model (a saved MRAD model) or --clip (a CLIP checkpoint, or random-small for an offline run).")
    if clip in RANDOM_BACKBONES:
        _log(RANDOM_WARNING.format(name=clip))
        torch.manual_seed(seed)
        return MRADForAnomalyDetection.from_clip(CLIPConfig(**RANDOM_BACKBONES[clip]), **overrides)
    _log(f"Loading pretrained CLIP weights from {clip}")
    return MRADForAnomalyDetection.from_clip(clip, **overrides)


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named or found (recursively) in folders; masks and ignored files per `data.loaders.scan_folder`."""
    from ..data.loaders import IMAGE_EXTENSIONS, scan_folder

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            scan = scan_folder(path)  # the loaders' one rule for what is an image and what is a mask
            if scan.masks:
                _log(f"Skipping {len(scan.masks)} ground-truth mask file(s) under '{path}' (a 'ground_truth'/'masks'/'gt' folder or a '_mask' name), e.g. {scan.masks[0]}")
            if scan.ignored:
                _log(scan.summary(path))
            if not scan.images:
                raise CLIError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder '{path}'.")
            paths.extend(scan.images)
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"'{path}' is neither an image file nor a folder.")
    return paths


def _looks_like_mask(relative: Path) -> bool:
    """Ground-truth masks inside a dataset folder are not inputs: `data.loaders.classify_file`, the one rule."""
    from ..data.loaders import classify_file

    return classify_file(Path(relative).with_suffix(".png"), Path()) == "mask"


def dataset_options(sub, what: str = "the dataset", *, required: bool = True) -> None:
    """`--dataset`, `--data-root`, `--categories` and the explicit folders, for every command that reads a dataset."""
    sub.add_argument("--dataset", required=required, help=f"{what}: mvtec, visa, mpdd, btad, ..., mvtec-layout, or folder (your own data)")
    sub.add_argument("--data-root", help="the dataset folder (with --normal-dir etc.: the folder they are relative to)")
    sub.add_argument("--categories", nargs="+", help="only these categories")
    sub.add_argument("--normal-dir", action="append", default=[], metavar="DIR", help="--dataset folder: a folder of normal images (repeatable, globs allowed)")
    sub.add_argument("--abnormal-dir", action="append", default=[], metavar="DIR", help="--dataset folder: a folder of anomalous images, named after the defect (repeatable, globs allowed)")
    sub.add_argument("--mask-dir", action="append", default=[], metavar="DIR", help="--dataset folder: masks of the anomalous images, matched by file stem (repeatable, globs allowed)")


def load_dataset_from_args(args, **kwargs):
    """The dataset named by `dataset_options`' arguments (`kwargs`, e.g. split=..., go to the loader)."""
    from ..data.loaders import load_benchmark

    explicit = {"normal_dirs": args.normal_dir, "abnormal_dirs": args.abnormal_dir, "mask_dirs": args.mask_dir}
    if not args.data_root and not any(explicit.values()):
        raise CLIError(f"--dataset {args.dataset} needs --data-root DIR (or, with --dataset folder, --normal-dir/--abnormal-dir).")
    if any(explicit.values()):
        kwargs.update(explicit)
    import warnings

    from ..data.loaders import IgnoredFilesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredFilesWarning)
        dataset = load_benchmark(args.dataset, args.data_root, categories=args.categories, **kwargs)
    for warning in caught:  # the loader's one-line summary of what it did not read, printed as a line
        if issubclass(warning.category, IgnoredFilesWarning):
            _log(str(warning.message))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return dataset


def _write_json(path: Path, payload) -> None:
    from ..models.mrad.memory_bank_mrad import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)

    atomic_write(path, write)


def _build_bank_from(detector, dataset, *, source: str, batch_size: int, on_error: str):
    """Build (and attach) a bank from a loader dataset, reading files through MRAD's decoder.

    Unreadable images or masks are skipped and listed in `bank.metadata["skipped_files"]` (`on_error="skip"`),
    or stop the command with a one-line error (`"fail"`).
    """
    from ..data.loaders import iter_readable_rows
    from ..models.mrad.image_processing_mrad import MRADImageProcessor, MRADInputError

    processor = MRADImageProcessor.from_config(detector.config)
    skipped: list[dict[str, str]] = []
    rows = iter_readable_rows(dataset, processor.load_pair, on_error=on_error, failures=skipped)
    try:
        bank = detector.build_memory_bank(rows, batch_size=batch_size, source=source, image_processor=processor)
    except MRADInputError as error:
        raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error
    if skipped:
        bank.metadata["skipped_files"] = skipped
    return bank


def _report_skipped(skipped: list[dict[str, str]], where: str) -> None:
    """The summary line of a run that skipped unreadable files: how many, the first one, where the full list is."""
    if skipped:
        _log(f"SKIPPED {len(skipped)} file(s) that could not be read, e.g. {skipped[0]['path']}: {skipped[0]['error']} "
             f"All skipped files are listed in {where}.")


def _detector_pipeline(detector):
    from transformers import pipeline

    from ..models.mrad.image_processing_mrad import MRADImageProcessor

    processor = MRADImageProcessor.from_config(detector.config)
    return processor, pipeline("anomaly-detection", model=detector, image_processor=processor, device=detector.device)
