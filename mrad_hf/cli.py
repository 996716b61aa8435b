# SPDX-License-Identifier: Apache-2.0
"""The `mrad` command: thin wrappers over the package (build banks, predict, make synthetic data, demo).

    mrad demo --output-dir outputs/demo                      # the README's end-to-end run
    mrad make-synthetic --output-dir data/synthetic
    mrad build-bank --clip openai/clip-vit-large-patch14-336 --dataset visa --data-root /data/visa \
        --output banks/visa.safetensors --save-model models/mrad-tf-visa
    mrad predict --model models/mrad-tf-visa images/ --output-dir outputs/predict --threshold 0.5
    mrad evaluate --clip openai/clip-vit-large-patch14-336 --bank-from visa --bank-root /data/visa \
        --dataset mvtec --data-root /data/mvtec --output-dir results/mvtec

Every command prints what it uses (in particular whether the CLIP weights are pretrained or random) and
exits with a one-line error, not a traceback, on bad input (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import cli_hub, cli_tools, cli_train

__all__ = ["main", "RANDOM_BACKBONES", "load_detector"]

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
    from .features_mrad import set_backbone_dtype

    if dtype and dtype != "float32":
        _log(f"CLIP tower in {dtype}; memory bank, retrieval and scores stay float32 (opt-in; slower than float32 on CPUs without bf16 matrix units)")
    return set_backbone_dtype(detector, dtype)


def _load_detector(model: str | None, clip: str | None, *, image_size: int | None, seed: int, **overrides):
    import torch
    from transformers import CLIPConfig

    from .memory_bank import verify_model_memory
    from .modeling_mrad import MRADForAnomalyDetection

    overrides = {key: value for key, value in overrides.items() if value is not None}
    if image_size is not None:
        overrides["image_size"] = image_size
    if model:
        detector = MRADForAnomalyDetection.from_pretrained(model)
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
    from .data.loaders import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            masks = [p for p in found if _looks_like_mask(p.relative_to(path))]
            if masks:
                _log(f"Skipping {len(masks)} ground-truth mask file(s) under '{path}' (a 'ground_truth' folder or a '_mask' name), e.g. {masks[0]}")
            found = [p for p in found if p not in set(masks)]
            if not found:
                raise CLIError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder '{path}'.")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"'{path}' is neither an image file nor a folder.")
    return paths


def _looks_like_mask(relative: Path) -> bool:
    """Ground-truth masks inside a dataset folder (MVTec-style `ground_truth/`, `<id>_mask.png`) are not inputs."""
    parts = {part.lower() for part in relative.parts[:-1]}
    return bool(parts & {"ground_truth", "gt", "masks"}) or relative.stem.lower().endswith("_mask")


def _write_json(path: Path, payload) -> None:
    from .memory_bank import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)

    atomic_write(path, write)


# ---------------------------------------------------------------------- commands
def cmd_make_synthetic(args) -> int:
    from .data.synthetic import make_synthetic_benchmark

    options = {"categories": tuple(args.categories)} if args.categories else {}
    root = make_synthetic_benchmark(
        args.output_dir, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite, progress=True, **options
    )
    _log(f"Synthetic benchmark (MVTec layout) written to {root}")
    return 0


def _build_bank_from(detector, dataset, *, source: str, batch_size: int, on_error: str):
    """Build (and attach) a bank from a loader dataset, reading files through MRAD's decoder.

    Unreadable images or masks are skipped and listed in `bank.metadata["skipped_files"]` (`on_error="skip"`),
    or stop the command with a one-line error (`"fail"`).
    """
    from .data.loaders import iter_readable_rows
    from .image_processing_mrad import MRADImageProcessor, MRADInputError

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


def cmd_build_bank(args) -> int:
    from .data.loaders import load_benchmark
    from .memory_bank import atomic_directory

    detector = load_detector(args.model, args.clip, image_size=args.image_size, seed=args.seed, dtype=args.dtype)
    dataset = load_benchmark(args.dataset, args.data_root, categories=args.categories, split=args.split)
    _log(f"Building the memory bank from {len(dataset)} {args.dataset} images ({args.split} split) in {args.data_root}")
    started = time.perf_counter()
    bank = _build_bank_from(detector, dataset, source=args.source or args.dataset, batch_size=args.batch_size, on_error=args.on_error)
    elapsed = time.perf_counter() - started
    path = bank.save(args.output)
    built = bank.counts()["image_entries"]
    _log(f"{bank} -> {path} ({elapsed:.1f} s, {built / max(elapsed, 1e-9):.2f} images/s)")
    if args.save_model:
        with atomic_directory(args.save_model) as staging:  # an interrupted save leaves the old folder intact
            detector.save_pretrained(staging)
        _log(f"Model with its bank saved to {args.save_model} (load with AutoModel.from_pretrained or pipeline('anomaly-detection'))")
    _report_skipped(bank.metadata.get("skipped_files", []), f"the bank's metadata ('skipped_files' in {path})")
    return 0


def _report_skipped(skipped: list[dict[str, str]], where: str) -> None:
    """The summary line of a run that skipped unreadable files: how many, the first one, where the full list is."""
    if skipped:
        _log(f"SKIPPED {len(skipped)} file(s) that could not be read, e.g. {skipped[0]['path']}: {skipped[0]['error']} "
             f"All skipped files are listed in {where}.")


def _detector_pipeline(detector):
    from transformers import pipeline

    from .image_processing_mrad import MRADImageProcessor

    processor = MRADImageProcessor.from_config(detector.config)
    return processor, pipeline("anomaly-detection", model=detector, image_processor=processor, device=detector.device)


def cmd_predict(args) -> int:
    from tqdm.auto import tqdm

    from .image_processing_mrad import MRADInputError
    from .visualization import save_panel

    detector = load_detector(args.model, args.clip, seed=args.seed)
    if args.bank:
        detector.set_memory_bank(args.bank)
        _log(f"Using memory bank {args.bank}")
    _set_dtype(detector, args.dtype)  # after the bank check, which fingerprints the float32 weights
    processor, detect = _detector_pipeline(detector)
    paths = _collect_images(args.inputs)
    output_dir = Path(args.output_dir)
    results, failures = [], []
    for path in tqdm(paths, desc="Scoring", unit="img"):
        try:
            image = processor.load(path)
            prediction = detect(image, threshold=args.threshold)
            if not math.isfinite(prediction["score"]):
                raise MRADInputError(f"Image '{path}' gave a non-finite score ({prediction['score']}); it is not scored. Check the image and the bank.")
        except MRADInputError as error:
            if args.on_error == "fail":
                raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error
            failures.append({"path": str(path), "error": str(error)})
            continue
        record = {"path": str(path), "score": prediction["score"]}
        if "is_anomalous" in prediction:  # --threshold, or the model's calibration
            record.update(label=prediction["label"], is_anomalous=prediction["is_anomalous"], thresholds=prediction["thresholds"])
        heatmap = output_dir / "heatmaps" / f"{len(results):05d}_{path.stem}.png"
        value_range = None if args.stretch else (0.0, 1.0)
        save_panel(heatmap, image, prediction["anomaly_map"], title=f"{path.name}  score={prediction['score']:.4f}", value_range=value_range)
        record["heatmap"] = str(heatmap)
        results.append(record)
        _log(f"{prediction['score']:.6f}  {path}")
    summary = {"scored": len(results), "failed": len(failures), "results": results, "failures": failures}
    _write_json(output_dir / "scores.json", summary)
    _log(f"Scored {len(results)} of {len(paths)} image(s). Scores: {output_dir / 'scores.json'}; heatmaps: {output_dir / 'heatmaps'}")
    _report_skipped(failures, f"'failures' in {output_dir / 'scores.json'}")
    return 0


def cmd_demo(args) -> int:
    """Synthetic benchmark from real CC0 textures -> bank from auxiliary categories -> scores + heatmaps on a held-out one."""
    import numpy as np

    from .data.loaders import load_mvtec_layout
    from .data.synthetic import make_synthetic_benchmark
    from .evaluation.metrics import image_auroc as compute_image_auroc
    from .evaluation.metrics import pixel_auroc as compute_pixel_auroc
    from .visualization import save_panel

    output_dir = Path(args.output_dir)
    data_root = output_dir / "data"
    if not (data_root / "manifest.json").exists():
        make_synthetic_benchmark(data_root, image_size=256, seed=args.seed, overwrite=True)
    temperature = args.retrieval_temperature
    if temperature is None:
        temperature = RANDOM_DEMO_TEMPERATURE if args.clip in RANDOM_BACKBONES else 1.0
    detector = load_detector(None, args.clip, image_size=args.image_size, seed=args.seed, retrieval_temperature=temperature)
    _log(f"Retrieval temperature: {temperature} (the reference uses 1.0{'; see RANDOM_DEMO_TEMPERATURE' if temperature != 1.0 else ''})")
    protocol = args.protocol or ("held-out-images" if args.clip in RANDOM_BACKBONES else "zero-shot")
    dataset = load_mvtec_layout(data_root)
    categories = sorted(set(dataset["category"]))
    if protocol == "zero-shot":
        # the paper's protocol: the memory comes from other categories than the ones scored
        target = args.target or categories[-1]
        memory = dataset.filter(lambda category: category != target, input_columns="category")  # no image decoding
        test = dataset.filter(lambda category: category == target, input_columns="category")
        _log(f"Protocol zero-shot: memory from {[c for c in categories if c != target]}, scoring held-out category '{target}'")
    else:
        # random features do not transfer across textures; show retrieval on unseen images of seen textures
        memory = dataset.select(range(0, len(dataset), 2))
        test = dataset.select(range(1, len(dataset), 2))
        _log(f"Protocol held-out-images: memory from every other image of {categories}, scoring the other {len(test)} images")
    bank = detector.build_memory_bank(memory, source=f"synthetic:{protocol}")
    bank.save(output_dir / "memory_bank.safetensors")
    _, detect = _detector_pipeline(detector)
    scores, labels, pixel_maps, pixel_masks = [], [], [], []
    for index, row in enumerate(test):
        prediction = detect(row["image"])
        mask = np.zeros(prediction["anomaly_map"].shape, bool) if row["mask"] is None else np.asarray(row["mask"].convert("L")) > 0
        scores.append(prediction["score"])
        labels.append(int(row["label"]))
        pixel_maps.append(prediction["anomaly_map"])
        pixel_masks.append(mask)
        title = f"{row['defect_type']}   score={prediction['score']:.4f}"
        save_panel(output_dir / "heatmaps" / f"{index:03d}_{row['defect_type']}.png", row["image"], prediction["anomaly_map"], mask=mask, title=title, value_range=None)
        _log(f"{'anomaly' if row['label'] else 'normal':7s}  score={prediction['score']:.6f}  {Path(row['path']).relative_to(data_root)}")
    image_auroc = compute_image_auroc(labels, scores)
    pixel_auroc = compute_pixel_auroc(np.stack(pixel_masks), np.stack(pixel_maps))  # images share one size here
    summary = {
        "backbone": args.clip,
        "pretrained": args.clip not in RANDOM_BACKBONES,
        "retrieval_temperature": temperature,
        "protocol": protocol,
        "memory_entries": bank.counts(),
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "scores": [{"path": r["path"], "label": int(r["label"]), "score": s} for r, s in zip(test, scores)],
    }
    _write_json(output_dir / "demo_results.json", summary)
    _log(f"Image AUROC: {image_auroc:.3f}   pixel AUROC: {pixel_auroc:.3f}   ({protocol}, {len(test)} images)")
    _log(f"Heatmaps (image | overlay | ground truth): {output_dir / 'heatmaps'}   results: {output_dir / 'demo_results.json'}")
    if args.clip in RANDOM_BACKBONES:
        _log(RANDOM_WARNING.format(name=args.clip))
    return 0


def cmd_evaluate(args) -> int:
    """Cross-dataset protocol: memory from one dataset (--bank-from/--bank-root or --bank), test on another."""
    from .data.loaders import load_benchmark
    from .evaluation.runner import evaluate_dataset
    from .image_processing_mrad import MRADInputError

    detector = load_detector(args.model, args.clip, image_size=args.image_size, seed=args.seed, dtype=None if args.bank else args.dtype)
    output_dir = Path(args.output_dir)
    if args.bank:
        detector.set_memory_bank(args.bank)
        _set_dtype(detector, args.dtype)  # after the bank check, which fingerprints the float32 weights
        bank_source = args.bank
    elif args.bank_from:
        if not args.bank_root:
            raise CLIError("--bank-from needs --bank-root (the auxiliary dataset's folder).")
        auxiliary = load_benchmark(args.bank_from, args.bank_root)
        _log(f"Building the memory bank from {len(auxiliary)} {args.bank_from} test images")
        bank = _build_bank_from(detector, auxiliary, source=args.bank_from, batch_size=args.batch_size, on_error=args.on_error)
        bank_path = bank.save(output_dir / "memory_bank.safetensors")
        _report_skipped(bank.metadata.get("skipped_files", []), f"'skipped_files' in the metadata of {bank_path}")
        bank_source = args.bank_from
    elif detector.config.image_bank_size:
        bank_source = (detector.config.memory_bank_metadata or {}).get("source", "model")
    else:
        raise CLIError("No memory bank: pass --bank FILE, --bank-from NAME --bank-root DIR, or a --model saved with a bank.")
    dataset = load_benchmark(args.dataset, args.data_root, categories=args.categories)
    _log(f"Evaluating on {len(dataset)} {args.dataset} test images (memory: {bank_source}); results stream to {output_dir}")
    run_info = {"model": args.model or args.clip, "pretrained": (args.clip not in RANDOM_BACKBONES) if args.clip else None, "bank": bank_source}
    try:
        results = evaluate_dataset(
            detector, dataset, output_dir, name=args.dataset, batch_size=args.batch_size,
            heatmaps_per_category=args.heatmaps, aupro_protocol=args.aupro, resume=not args.no_resume, run_info=run_info,
            on_error=args.on_error,
        )
    except MRADInputError as error:
        raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    _log(f"Tables: {output_dir / 'results.md'}, {output_dir / 'results.csv'}, {output_dir / 'results.json'}; heatmaps: {output_dir / 'heatmaps'}")
    _report_skipped(results["skipped_files"], f"'skipped_files' in {output_dir / 'results.json'}")
    if args.clip in RANDOM_BACKBONES:
        _log(RANDOM_WARNING.format(name=args.clip))
    return 0 if results["per_category"] else 1


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrad", description="MRAD zero-shot anomaly detection (ICLR 2026) on Hugging Face transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def dataset_options(sub, what):
        sub.add_argument("--dataset", required=True, help=f"{what}: mvtec, visa, mpdd, btad, ..., mvtec-layout, or folder (your own data)")
        sub.add_argument("--data-root", required=True)
        sub.add_argument("--categories", nargs="+")

    def model_options(sub):
        sub.add_argument("--model", help="a saved MRAD model folder or Hub id")
        sub.add_argument("--clip", help="a CLIP checkpoint (Hub id or folder), or random-small / random-vit-l14-336 (random weights)")
        sub.add_argument("--seed", type=int, default=0, help="seed for random backbones")
        sub.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                         help="CLIP tower precision (memory, retrieval, scores stay float32); half precision pays off on GPUs and CPUs with AMX/AVX512-BF16")

    demo = commands.add_parser("demo", help="end-to-end run on a synthetic benchmark made from real CC0 textures")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--clip", default="random-tiny", help="CLIP checkpoint; default: a random tiny ViT (offline)")
    demo.add_argument("--retrieval-temperature", type=float, help=f"default 1.0, or {RANDOM_DEMO_TEMPERATURE} for random backbones")
    demo.add_argument("--image-size", type=int, default=224, help="network input size (518 for the paper setting)")
    demo.add_argument("--protocol", choices=("zero-shot", "held-out-images"), help="default: zero-shot for real weights, held-out-images for random ones")
    demo.add_argument("--target", help="zero-shot: the held-out category (default: the last one)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)

    synthetic = commands.add_parser("make-synthetic", help="write a synthetic-defect benchmark in the MVTec layout")
    synthetic.add_argument("--output-dir", required=True)
    synthetic.add_argument("--categories", nargs="+")
    synthetic.add_argument("--image-size", type=int, default=256)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--overwrite", action="store_true")
    synthetic.set_defaults(handler=cmd_make_synthetic)

    build = commands.add_parser("build-bank", help="build the two-level memory bank from a labelled auxiliary dataset")
    model_options(build)
    dataset_options(build, "the auxiliary dataset")
    build.add_argument("--split", default="test", help="the reference builds banks from the auxiliary test split")
    build.add_argument("--source", help="name stored in the bank's metadata (default: the dataset name)")
    build.add_argument("--output", required=True, help="bank file (.safetensors)")
    build.add_argument("--save-model", help="also save the model with this bank attached to this folder")
    build.add_argument("--image-size", type=int, help="network input size (default 518)")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="unreadable images/masks: skip and report, or stop")
    build.set_defaults(handler=cmd_build_bank)

    predict = commands.add_parser("predict", help="score images (files or folders), write heatmap PNGs and scores.json")
    model_options(predict)
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("--bank", help="memory bank file to use instead of the model's own")
    predict.add_argument("--output-dir", default="outputs/predict")
    predict.add_argument("--threshold", type=float, help="image score above which an image is labelled anomalous")
    predict.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="unreadable images: skip and report, or stop")
    predict.add_argument("--stretch", action="store_true", help="stretch each heatmap to its own min-max")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="paper-protocol evaluation: per-category tables (Markdown, CSV, JSON) and heatmaps")
    model_options(evaluate)
    dataset_options(evaluate, "the benchmark to score")
    evaluate.add_argument("--bank", help="a memory bank file")
    evaluate.add_argument("--bank-from", help="build the memory from this auxiliary dataset's test split (e.g. visa)")
    evaluate.add_argument("--bank-root", help="the auxiliary dataset's folder")
    evaluate.add_argument("--output-dir", default="outputs/evaluate")
    evaluate.add_argument("--image-size", type=int, help="network input size for a new model (default 518)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--heatmaps", type=int, default=3, help="heatmap panels per category")
    evaluate.add_argument("--aupro", choices=("reference", "anomalib"), default="reference")
    evaluate.add_argument("--no-resume", action="store_true", help="recompute categories already finished in --output-dir")
    evaluate.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="unreadable images/masks: skip and report, or stop")
    evaluate.set_defaults(handler=cmd_evaluate)
    cli_hub.register(commands)  # mrad push / mrad pull
    cli_tools.register(commands)  # mrad bank / calibrate / explain / serve
    cli_train.register(commands)  # mrad train
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("mrad: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for users; --debug for developers
        if args.debug or os.environ.get("MRAD_DEBUG"):
            raise
        print(f"mrad {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
