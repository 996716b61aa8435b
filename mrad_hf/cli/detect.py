# SPDX-License-Identifier: Apache-2.0
"""`mrad demo`, `make-synthetic`, `build-bank`, `predict` and `evaluate`: the detection commands."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
from pathlib import Path

from .common import (
    RANDOM_BACKBONES,
    RANDOM_DEMO_TEMPERATURE,
    RANDOM_WARNING,
    CLIError,
    _build_bank_from,
    _collect_images,
    _detector_pipeline,
    _log,
    _report_skipped,
    _write_json,
    dataset_options,
    detector_from_args,
    image_size_int,
    image_threshold,
    load_dataset_from_args,
    model_options,
    non_negative_int,
    random_note,
    score_text,
    seed_int,
    without_outputs,
)

__all__ = ["register"]


def cmd_make_synthetic(args) -> int:
    from ..data.synthetic import make_synthetic_benchmark

    options = {"categories": tuple(args.categories)} if args.categories else {}
    root = make_synthetic_benchmark(
        args.output_dir, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite, progress=True, **options
    )
    _log(f"Synthetic benchmark (MVTec layout) written to {root}")
    return 0


def cmd_build_bank(args) -> int:
    from ..memory.files import MODEL_FOLDER, check_bank_output, check_output_folder, save_bank, save_model
    from ..tools.run_folder import writer_lock

    check_bank_output(args.output)  # before the long work: outputs never replace what the package did not write
    if args.save_model:
        check_output_folder(args.save_model, MODEL_FOLDER)
    detector = detector_from_args(args)
    dataset = load_dataset_from_args(args, split=args.split)
    with contextlib.ExitStack() as locks:  # issue 13 §5: one writer of this bank (and model folder) at a time
        locks.enter_context(writer_lock(args.output, "the bank"))
        if args.save_model:
            locks.enter_context(writer_lock(args.save_model, "the model folder"))
        anomalous = sum(int(label) for label in dataset["label"])  # the label column: no image is decoded
        what = "images" if args.dataset == "folder" else f"{args.dataset} images ({args.split} split)"  # no splits
        _log(
            f"Building the memory bank from {len(dataset)} {what}{f' in {args.data_root}' if args.data_root else ''}: "
            f"{len(dataset) - anomalous} normal, {anomalous} anomalous"
        )
        started = time.perf_counter()
        bank = _build_bank_from(
            detector, dataset, source=args.source or args.dataset, batch_size=args.batch_size, on_error=args.on_error
        )
        elapsed = time.perf_counter() - started
        if args.save_model:  # the model first: if it cannot be written, the old bank and model both stay as they were
            save_model(detector, args.save_model)  # staged: an interrupted save leaves the old folder intact
        path = save_bank(bank, args.output)
        built = bank.counts()["image_entries"]
        _log(f"{bank} -> {path} ({elapsed:.1f} s, {built / max(elapsed, 1e-9):.2f} images/s)")
        if args.save_model:
            _log(
                f"Model with its bank saved to {args.save_model} (load with AutoModel.from_pretrained or pipeline('anomaly-detection'))"
            )
    _report_skipped(bank.metadata.get("skipped_files", []), f"the bank's metadata ('skipped_files' in {path})")
    return 0


def _predictions(
    detector, detect, paths, *, batch_size: int, threshold, failures: list, on_error: str, num_workers: int = 0
):
    """(path, image, prediction) for each readable image, in input order, as `evaluation.scoring.iter_scored` scores
    them (`batch_size` images per forward pass, decoded in its DataLoader; split between the processes of a
    `torchrun` / `accelerate launch` run and gathered); `prediction` is the pipeline's own post-processing of that
    item (map at the image's size, threshold or calibration decision), so it equals what `detect(path)` returns.

    Unreadable files are appended to `failures` (`on_error="skip"`) or stop the run (`"fail"`).
    """
    import torch

    from ..evaluation.scoring import iter_scored
    from ..models.mrad.image_processing_mrad import MRADInputError

    steps = iter_scored(
        detector,
        paths,
        processor=detect.image_processor,
        batch_size=batch_size,
        on_error=on_error,
        keep_images=True,
        num_workers=num_workers,
    )
    try:
        for step in steps:
            for result in step:
                path = paths[result.index]
                if result.error is not None:
                    failures.append({"path": str(path), "error": result.error})
                    continue
                outputs = {
                    "anomaly_map": result.anomaly_map[None],
                    "anomaly_score": torch.tensor([result.score]),
                    "original_sizes": torch.tensor([result.original_size]),
                }
                yield path, result.image, detect.postprocess(outputs, threshold=threshold)
    except MRADInputError as error:
        raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error


class _StreamedFailures(list):
    """The failure list of a predict run; each failure is also appended to scores.jsonl as it happens."""

    def __init__(self, lines):
        super().__init__()
        self.lines = lines

    def append(self, record) -> None:
        super().append(record)
        self.lines.write(record)


def cmd_predict(args) -> int:
    detector = detector_from_args(args)  # first: a wrong --model / --bank / --device fails before anything loads

    from tqdm.auto import tqdm

    from ..tools import run_folder
    from ..tools.visualization import save_panel

    _, detect = _detector_pipeline(detector)
    output_dir = Path(args.output_dir)
    paths = _collect_images(args.inputs, output_dir=output_dir)
    # issue 13 §4-5: a fingerprinted run folder; per-image results appended to scores.jsonl as they are computed
    settings = {"threshold": args.threshold, "stretch": args.stretch, "dtype": str(detector.dtype)}
    images = run_folder.dataset_identity([os.path.abspath(path) for path in paths])
    fingerprint = run_folder.run_fingerprint(
        command="predict", model=detector, settings=settings, extra={"images": images}
    )
    from ..evaluation.scoring import broadcast_from_main, init_distributed

    rank, world = init_distributed()  # torchrun / accelerate launch: images split, results gathered on process 0
    run, refusal, done = None, None, {}
    if rank == 0:  # process 0 alone owns the folder and prints; the others learn what is left to do from it
        try:
            run = run_folder.open_run_folder(
                output_dir,
                fingerprint,
                artefacts=("scores.jsonl", "scores.json", "heatmaps"),
                overwrite=args.overwrite,
                resume_anyway=args.resume_anyway,
            )
            if run.resumed:
                done = {record["path"]: record for record in run_folder.read_json_lines(output_dir / "scores.jsonl")}
        except Exception as error:
            refusal = error
    refusal, done = broadcast_from_main((refusal, done) if rank == 0 else None)
    if refusal is not None:
        raise refusal
    done = {path: record for path, record in done.items() if "error" not in record}  # failed images are tried again
    todo = [path for path in paths if str(path) not in done]
    if rank != 0:
        for _ in _predictions(
            detector,
            detect,
            todo,
            batch_size=args.batch_size,
            threshold=args.threshold,
            failures=[],
            on_error=args.on_error,
            num_workers=args.num_workers,
        ):
            pass
        return 0
    if done:
        _log(
            f"Resuming the {'unfinished ' if run.was_incomplete else ''}run in {output_dir}: {len(done)} of {len(paths)} image(s) already done"
        )
    if world > 1:
        _log(f"Scoring {len(todo)} image(s) in {world} processes")
    position = {str(path): index for index, path in enumerate(paths)}
    lines = run_folder.JsonLinesWriter(output_dir / "scores.jsonl")
    results, failures = [], _StreamedFailures(lines)
    value_range = None if args.stretch else (0.0, 1.0)
    with lines, tqdm(total=len(todo), desc="Scoring", unit="img") as bar:
        predictions = _predictions(
            detector,
            detect,
            todo,
            batch_size=args.batch_size,
            threshold=args.threshold,
            failures=failures,
            on_error=args.on_error,
            num_workers=args.num_workers,
        )
        for path, image, prediction in predictions:
            bar.n = len(results) + len(failures) + 1
            bar.refresh()
            if not math.isfinite(prediction["score"]):
                message = f"Image '{path}' gave a non-finite score ({prediction['score']}); it is not scored. Check the image and the bank."
                if args.on_error == "fail":
                    raise CLIError(message)
                failures.append({"path": str(path), "error": message})
                continue
            record = {"path": str(path), "score": prediction["score"]}
            if "is_anomalous" in prediction:  # --threshold, or the model's calibration
                record.update(
                    label=prediction["label"],
                    is_anomalous=prediction["is_anomalous"],
                    thresholds=prediction["thresholds"],
                )
            heatmap = (
                output_dir / "heatmaps" / run_folder.bounded_name(position[str(path)], path)
            )  # <= 255 bytes, keeps the defect folder
            try:
                save_panel(
                    heatmap,
                    image,
                    prediction["anomaly_map"],
                    title=f"{path.name}  score={prediction['score']:.4f}",
                    value_range=value_range,
                )
            except (
                OSError,
                MemoryError,
            ) as error:  # disk full, name too long: this image's failure, the scores so far stay
                message = f"Image '{path}' failed: {type(error).__name__}: {error or 'out of memory'}"
                if args.on_error == "fail":
                    raise CLIError(f"{message} (scores so far are in {output_dir / 'scores.jsonl'})") from error
                failures.append({"path": str(path), "error": message})
                continue
            record["heatmap"] = str(heatmap)
            results.append(record)
            lines.write(record)
            _log(f"{score_text(prediction)}  {path}")
        bar.n = len(todo)
        bar.refresh()
    results = sorted([*done.values(), *results], key=lambda record: position[record["path"]])
    from ..memory.building import random_backbone

    summary = {
        "scored": len(results),
        "failed": len(failures),
        "random_backbone": random_backbone(detector),  # not None: the scores say nothing about MRAD's accuracy
        "results": results,
        "failures": list(failures),
    }
    _write_json(output_dir / "scores.json", summary)
    run.finish()
    _log(
        f"Scored {len(results)} of {len(paths)} image(s). Scores: {output_dir / 'scores.json'}; heatmaps: {output_dir / 'heatmaps'}"
    )
    _report_skipped(failures, f"'failures' in {output_dir / 'scores.json'}")
    return 0


def cmd_demo(args) -> int:
    """Synthetic benchmark from real CC0 textures -> bank from auxiliary categories -> scores + heatmaps on a held-out one."""
    import numpy as np

    from ..data.loaders import load_mvtec_layout
    from ..data.synthetic import make_synthetic_benchmark
    from ..evaluation.metrics import image_auroc as compute_image_auroc
    from ..evaluation.metrics import pixel_auroc as compute_pixel_auroc
    from ..tools.visualization import save_panel

    # absolute the way the loaders make dataset paths absolute (no symlink resolution), so the two always agree
    output_dir = Path(os.path.abspath(os.path.expanduser(args.output_dir)))
    data_root = output_dir / "data"
    if not (data_root / "manifest.json").exists():
        make_synthetic_benchmark(data_root, image_size=256, seed=args.seed, overwrite=True)
    temperature = args.retrieval_temperature
    if temperature is None:
        temperature = RANDOM_DEMO_TEMPERATURE if args.clip in RANDOM_BACKBONES else 1.0
    detector = detector_from_args(args, retrieval_temperature=temperature)
    _log(
        f"Retrieval temperature: {temperature} (the reference uses 1.0{'; see RANDOM_DEMO_TEMPERATURE' if temperature != 1.0 else ''})"
    )
    protocol = args.protocol or ("held-out-images" if args.clip in RANDOM_BACKBONES else "zero-shot")
    dataset = load_mvtec_layout(data_root)
    categories = sorted(set(dataset["category"]))
    if protocol == "zero-shot":
        # the paper's protocol: the memory comes from other categories than the ones scored
        target = args.target or categories[-1]
        memory = dataset.filter(lambda category: category != target, input_columns="category")  # no image decoding
        test = dataset.filter(lambda category: category == target, input_columns="category")
        _log(
            f"Protocol zero-shot: memory from {[c for c in categories if c != target]}, scoring held-out category '{target}'"
        )
    else:
        # random features do not transfer across textures; show retrieval on unseen images of seen textures
        memory = dataset.select(range(0, len(dataset), 2))
        test = dataset.select(range(1, len(dataset), 2))
        _log(
            f"Protocol held-out-images: memory from every other image of {categories}, scoring the other {len(test)} images"
        )
    from ..memory import build_memory_bank, save_bank

    bank = build_memory_bank(detector, memory, source=f"synthetic:{protocol}", batch_size=args.batch_size)
    save_bank(bank, output_dir / "memory_bank.safetensors")
    _, detect = _detector_pipeline(detector)
    scores, labels, pixel_maps, pixel_masks = [], [], [], []
    for index, row in enumerate(test):
        prediction = detect(row["image"])
        mask = (
            np.zeros(prediction["anomaly_map"].shape, bool)
            if row["mask"] is None
            else np.asarray(row["mask"].convert("L")) > 0
        )
        scores.append(prediction["score"])
        labels.append(int(row["label"]))
        pixel_maps.append(prediction["anomaly_map"])
        pixel_masks.append(mask)
        title = f"{row['defect_type']}   score={prediction['score']:.4f}"
        save_panel(
            output_dir / "heatmaps" / f"{index:03d}_{row['defect_type']}.png",
            row["image"],
            prediction["anomaly_map"],
            mask=mask,
            title=title,
            value_range=None,
        )
        _log(
            f"truth={'anomaly' if row['label'] else 'normal':7s}  score={prediction['score']:.6f}  {os.path.relpath(row['path'], data_root)}"
        )
    image_auroc = compute_image_auroc(labels, scores)
    pixel_auroc = compute_pixel_auroc(np.stack(pixel_masks), np.stack(pixel_maps))  # images share one size here
    summary = {
        "backbone": args.clip,
        "pretrained": args.clip not in RANDOM_BACKBONES,
        "random_backbone": args.clip if args.clip in RANDOM_BACKBONES else None,
        "retrieval_temperature": temperature,
        "protocol": protocol,
        "memory_entries": bank.counts(),
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "scores": [{"path": r["path"], "label": int(r["label"]), "score": s} for r, s in zip(test, scores)],
    }
    model_dir = output_dir / "model"
    from ..memory.files import save_model

    save_model(detector, model_dir)  # the backbone, the bank and the settings the scores above used
    summary["model"] = str(model_dir)
    _write_json(output_dir / "demo_results.json", summary)
    _log(f"Image AUROC: {image_auroc:.3f}   pixel AUROC: {pixel_auroc:.3f}   ({protocol}, {len(test)} images)")
    _log(
        f"Heatmaps (image | overlay | ground truth): {output_dir / 'heatmaps'}   results: {output_dir / 'demo_results.json'}"
    )
    _log(f"Model (backbone + this bank + settings): {model_dir}")
    if args.clip in RANDOM_BACKBONES:
        _log(RANDOM_WARNING.format(name=args.clip))
    _log("Next: score your own images with what the demo built:")
    shown = os.path.relpath(model_dir)
    shown = str(model_dir) if shown.startswith("..") else shown
    _log(
        f"  mrad predict --model {shlex.quote(shown)} path/to/your_image.png --output-dir {shlex.quote(os.path.join(os.path.dirname(shown), 'predict'))}"
    )
    return 0


def cmd_evaluate(args) -> int:
    """Cross-dataset protocol: memory from one dataset (--bank-from/--bank-root or --bank), test on another."""
    import warnings

    from ..data.loaders import load_benchmark
    from ..evaluation.runner import BankOverlapWarning, evaluate_dataset
    from ..evaluation.scoring import init_distributed
    from ..models.mrad.image_processing_mrad import MRADInputError

    detector = detector_from_args(
        args
    )  # attaches --bank (checked against the float32 weights), then --dtype, --device
    output_dir = Path(args.output_dir)
    rank, _ = init_distributed()  # torchrun / accelerate launch: each category split, process 0 writes and prints
    if args.bank:
        bank_source = args.bank
    elif args.bank_from:
        if not args.bank_root:
            raise CLIError("--bank-from needs --bank-root (the auxiliary dataset's folder).")
        auxiliary = without_outputs(
            load_benchmark(args.bank_from, args.bank_root), output_dir, f"--bank-from {args.bank_from}"
        )
        _log(f"Building the memory bank from {len(auxiliary)} {args.bank_from} test images")
        bank = _build_bank_from(
            detector, auxiliary, source=args.bank_from, batch_size=args.batch_size, on_error=args.on_error
        )
        if rank == 0:
            from ..memory.files import save_bank

            bank_path = save_bank(bank, output_dir / "memory_bank.safetensors")
            _report_skipped(bank.metadata.get("skipped_files", []), f"'skipped_files' in the metadata of {bank_path}")
        bank_source = args.bank_from
    elif detector.config.image_bank_size:
        bank_source = (detector.memory_bank_metadata or {}).get("source", "model")
    else:
        raise CLIError(
            "No memory bank: pass --bank FILE, --bank-from NAME --bank-root DIR, or a --model saved with a bank."
        )
    dataset = load_dataset_from_args(args, output_dir=output_dir)
    _log(
        f"Evaluating on {len(dataset)} {args.dataset} test images (memory: {bank_source}); results stream to {output_dir}"
    )
    from ..memory.building import random_backbone

    random_name = random_backbone(detector)  # a random --clip, or recorded in the --model's / --bank's bank
    run_info = {
        "model": args.model or args.clip,
        "pretrained": False if random_name else ((args.clip not in RANDOM_BACKBONES) if args.clip else None),
        "random_backbone": random_name,
        "bank": bank_source,
    }
    try:
        with warnings.catch_warnings():  # printed below as one line, not as a Python warning
            warnings.simplefilter("ignore", BankOverlapWarning)
            results = evaluate_dataset(
                detector,
                dataset,
                output_dir,
                name=args.dataset,
                batch_size=args.batch_size,
                heatmaps_per_category=args.heatmaps,
                aupro_protocol=args.aupro,
                resume=not args.no_resume,
                run_info=run_info,
                on_error=args.on_error,
                num_workers=args.num_workers,
                exclude_bank_images=args.exclude_bank_images,
                overwrite=args.overwrite,
                resume_anyway=args.resume_anyway,
            )
    except MRADInputError as error:
        raise CLIError(f"{error} (--on-error skip reports and skips such files)") from error
    if results is None:  # not process 0
        return 0
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    _log(
        f"Tables: {output_dir / 'results.md'}, {output_dir / 'results.csv'}, {output_dir / 'results.json'}; heatmaps: {output_dir / 'heatmaps'}"
    )
    _report_skipped(results["skipped_files"], f"'skipped_files' in {output_dir / 'results.json'}")
    if results["bank_overlap"].get("message"):
        _log(results["bank_overlap"]["message"])
    if note := random_note(detector):
        _log(note)
    return 0 if results["per_category"] else 1


def run_folder_options(sub) -> None:
    """Issue 13 §4: an --output-dir holding a different run is refused unless one of these is given."""
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="--output-dir holds a different run: delete its results and start over",
    )
    sub.add_argument(
        "--resume-anyway",
        action="store_true",
        help="--output-dir holds a different run: keep its results and continue",
    )


def register(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="end-to-end run on a synthetic benchmark made from real CC0 textures: bank, scores, heatmaps, a saved model",
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where the data, heatmaps, results and model go")
    model_options(
        demo,
        model=False,
        clip_default="random-tiny",
        bank=False,
        on_error=False,
        image_size_default=224,
        temperature_help=f"softmax temperature of retrieval (default: 1.0, the reference's, or {RANDOM_DEMO_TEMPERATURE} for random backbones)",
    )
    demo.add_argument(
        "--protocol",
        choices=("zero-shot", "held-out-images"),
        help="default: zero-shot for real weights, held-out-images for random ones",
    )
    demo.add_argument("--target", help="zero-shot: the held-out category (default: the last one)")
    demo.set_defaults(handler=cmd_demo)

    synthetic = commands.add_parser("make-synthetic", help="write a synthetic-defect benchmark in the MVTec layout")
    synthetic.add_argument("--output-dir", required=True, help="the benchmark's root folder")
    synthetic.add_argument("--categories", nargs="+", help="textures to use (default: brick, grass, gravel)")
    synthetic.add_argument(
        "--image-size", type=image_size_int, default=256, help="side of the written images in pixels"
    )
    synthetic.add_argument("--seed", type=seed_int, default=0, help="random seed (crops, defects)")
    synthetic.add_argument("--overwrite", action="store_true", help="replace an existing benchmark in --output-dir")
    synthetic.set_defaults(handler=cmd_make_synthetic)

    build = commands.add_parser("build-bank", help="build the two-level memory bank from a labelled auxiliary dataset")
    model_options(build, bank=False)
    dataset_options(build, "the auxiliary dataset")
    build.add_argument(
        "--split", default="test", help="dataset split; the reference builds banks from the auxiliary test split"
    )
    build.add_argument("--source", help="name stored in the bank's metadata (default: the dataset name)")
    build.add_argument("--output", required=True, help="bank file (.safetensors)")
    build.add_argument("--save-model", help="also save the model with this bank attached to this folder")
    build.set_defaults(handler=cmd_build_bank)

    predict = commands.add_parser(
        "predict", help="score images (files or folders), write heatmap PNGs and scores.json"
    )
    model_options(predict, num_workers=True)
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("--output-dir", default="outputs/predict", help="where scores.json and heatmaps/ go")
    predict.add_argument(
        "--threshold",
        type=image_threshold,
        help="image score above which an image is labelled anomalous (default: the model's calibration, if any)",
    )
    predict.add_argument("--stretch", action="store_true", help="stretch each heatmap to its own min-max")
    run_folder_options(predict)
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser(
        "evaluate", help="paper-protocol evaluation: per-category tables (Markdown, CSV, JSON) and heatmaps"
    )
    model_options(evaluate, num_workers=True)
    dataset_options(evaluate, "the benchmark to score")
    evaluate.add_argument("--bank-from", help="build the memory from this auxiliary dataset's test split (e.g. visa)")
    evaluate.add_argument("--bank-root", help="the auxiliary dataset's folder (with --bank-from)")
    evaluate.add_argument(
        "--output-dir", default="outputs/evaluate", help="where tables, per-category results and heatmaps go"
    )
    evaluate.add_argument("--heatmaps", type=non_negative_int, default=3, help="heatmap panels per category")
    evaluate.add_argument(
        "--aupro",
        choices=("reference", "anomalib"),
        default="reference",
        help="AUPRO definition: the MRAD/AnomalyCLIP code's or anomalib's",
    )
    evaluate.add_argument(
        "--no-resume", action="store_true", help="recompute categories already finished in --output-dir"
    )
    evaluate.add_argument(
        "--exclude-bank-images",
        action="store_true",
        help="leave out scored images that are in the memory bank (same file content or id)",
    )
    run_folder_options(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)
