# SPDX-License-Identifier: Apache-2.0
"""`mrad bank`, `mrad calibrate`, `mrad explain`, `mrad serve`: living banks, decisions, explanations, demo app.

    mrad bank info banks/visa.safetensors
    mrad bank add banks/visa.safetensors --model models/mrad-tf-visa --dataset folder --data-root line3/ \
        --source line-3 --output banks/visa+line3.safetensors
    mrad bank add banks/visa.safetensors --model models/mrad-tf-visa --images bad/*.png --masks bad_masks/*.png \
        --label anomaly --source line-3-defects
    mrad bank merge banks/visa.safetensors banks/mvtec.safetensors --output banks/visa+mvtec.safetensors
    mrad bank remove banks/visa+line3.safetensors --source line-3 --output banks/visa.safetensors
    mrad calibrate --model models/mrad-tf-visa good/ --target-fpr 0.05 --save-model models/mrad-tf-visa-calibrated
    mrad explain --model models/mrad-tf-visa part.png --output-dir outputs/explain --top-k 5
    mrad serve --model models/mrad-tf-visa --port 7860          # needs the `app` extra (gradio)

`register(commands)` adds them to the parser built in `mrad_hf/cli/main.py`. The functions they call live in
`mrad_hf.memory.tools`, `mrad_hf.tools.calibration`, `mrad_hf.tools.explain` and `mrad_hf.tools.app`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common as _cli  # the shared helpers
from .common import image_threshold, model_options, port_int, positive_int, probability, unit_interval

__all__ = ["register"]

_FEATURE_FIELDS = (
    "image_size",
    "vv_start_layer",
    "feature_layer",
    "neighbor_kernel_sizes",
    "position_interpolation",
    "class_key_post_layernorm",
    "region_rule",
    "mask_threshold",
)


def _load_bank(path):
    return _cli.load_bank(path)


def _detector(args, bank=None, *, attach: bool = True):
    """The model the shared options name; a new --clip model takes the bank's feature settings; the bank is attached."""
    overrides = {}
    if bank is not None and not args.model:
        features = bank.metadata.get("features") or {}
        overrides.update({key: features[key] for key in _FEATURE_FIELDS if key in features})
        if "neighbor_kernel_sizes" in overrides:
            overrides["neighbor_kernel_sizes"] = tuple(overrides["neighbor_kernel_sizes"])
        size = overrides.pop("image_size", None)  # an explicit --image-size wins (and the bank check names a mismatch)
        if getattr(args, "image_size", None) is None and size is not None:
            args = argparse.Namespace(**{**vars(args), "image_size": size})  # passed as --image-size, not twice
    return _cli.detector_from_args(
        args, bank=bank if attach else None, **overrides
    )  # attached before --dtype / --device


def _samples(args) -> list | object:
    """Labelled samples from --dataset/--data-root (any loader), or from --images with one --label (and --masks)."""
    if args.dataset:
        return _cli.load_dataset_from_args(args)
    if not args.images:
        raise _cli.CLIError(
            "Give the images to add: --dataset folder --data-root DIR (good/ and <defect>/ sub-folders), or --images FILES --label normal|anomaly."
        )
    if not args.label:
        raise _cli.CLIError("--images needs --label normal or --label anomaly (one label for all of them).")
    from ..data.files import ignored_summary
    from ..memory.tools import samples_from_files

    if args.label == "normal" and args.masks:
        raise _cli.CLIError("Normal images have no defect masks; drop --masks or use --label anomaly.")
    samples, ignored = samples_from_files(
        args.images, args.label, args.masks
    )  # masks paired as the folder loader does
    if ignored:
        _cli._log(ignored_summary(ignored, "the --images/--masks inputs"))
    return samples


# ---------------------------------------------------------------------- mrad bank
def _print_info(info: dict) -> None:
    counts = info["counts"]
    _cli._log(
        f"source: {info['source']}   format version: {info['format_version']}   key widths: image {info['key_widths']['image']}, patch {info['key_widths']['patch']}"
    )
    _cli._log(
        f"entries: {counts['image_entries']} image ({counts['image_anomalous']} anomalous), {counts['patch_entries']} region ({counts['patch_anomalous']} anomalous)"
    )
    if info["random_backbone"]:
        _cli._log(
            f"NOTE: built with a RANDOMLY INITIALISED CLIP backbone ({info['random_backbone']}): a pipeline check"
        )
    for source, per in info["per_source"].items():
        _cli._log(f"  {source}: " + ", ".join(f"{count} {kind}" for kind, count in sorted(per.items())))
    if info["calibration"]:
        _cli._log(
            f"calibration: image threshold {info['calibration']['image_threshold']:.6f} at target FPR {info['calibration']['target_fpr']}"
        )
    for step in info["history"]:
        _cli._log(f"  history: {json.dumps(step)}")


def cmd_bank_info(args) -> int:
    from ..memory.tools import bank_info

    info = bank_info(_load_bank(args.bank))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _dedup(args):
    return None if args.no_dedup else args.dedup


def _dropped(count: int, args) -> str:
    """What de-duplication dropped, and how to keep it, for the summary line of `bank add` / `bank merge`."""
    return (
        f" ({count} near-duplicate entr{'y' if count == 1 else 'ies'} dropped; --no-dedup keeps them)"
        if count and not args.no_dedup
        else ""
    )


def _save(bank, path) -> None:
    from ..memory.files import save_bank

    saved = save_bank(bank, path)
    _cli._log(f"{bank} -> {saved}")


def cmd_bank_add(args) -> int:
    from ..memory.tools import add_samples

    bank = _load_bank(args.bank)
    detector = _detector(args, bank, attach=False)
    samples = _samples(args)
    skipped: list[dict[str, str]] = []
    result = add_samples(
        bank,
        detector,
        samples,
        source=args.source,
        dedup_threshold=_dedup(args),
        batch_size=args.batch_size,
        on_error=getattr(args, "on_error", "skip"),
        failures=skipped,
    )
    before, after = bank.counts(), result.counts()
    added = next(
        (step for step in reversed(result.metadata.get("history") or []) if step.get("operation") == "add"), {}
    )
    offered = added.get("entries") or {}  # the new images' entries, before de-duplication
    dropped = sum(offered.get(key, 0) for key in ("image_entries", "patch_entries")) - (
        after["image_entries"] + after["patch_entries"] - before["image_entries"] - before["patch_entries"]
    )
    _cli._log(
        f"Added source {args.source!r}: image entries {before['image_entries']} -> {after['image_entries']}, region entries {before['patch_entries']} -> {after['patch_entries']}"
        + _dropped(dropped, args)
    )
    if added.get("image_level_only_anomalies"):
        _cli._log(
            f"{added['image_level_only_anomalies']} anomalous image(s) had no mask: added as image-level anomalous entries only "
            "(no region entry; give <stem>_mask.png beside an image, or --masks, to add its defect region)"
        )
    _save(result, args.output or args.bank)
    _cli._report_skipped(skipped, "the lines above (not added)")
    for failure in skipped[1:]:
        _cli._log(f"  skipped {failure['path']}: {failure['error']}")
    return 0


def cmd_bank_merge(args) -> int:
    from ..memory.tools import merge_banks

    banks = [_load_bank(path) for path in args.banks]
    merged = merge_banks(banks, names=list(args.banks), dedup_threshold=_dedup(args))
    total = sum(b.counts()["image_entries"] + b.counts()["patch_entries"] for b in banks)
    kept = merged.counts()["image_entries"] + merged.counts()["patch_entries"]
    _cli._log(f"Merged {len(banks)} banks: {kept} of {total} entries kept" + _dropped(total - kept, args))
    _save(merged, args.output)
    return 0


def cmd_bank_remove(args) -> int:
    from ..memory.tools import remove_sources

    bank = _load_bank(args.bank)
    result = remove_sources(bank, args.source)
    _cli._log(
        f"Removed {args.source}: {bank.counts()['image_entries']} -> {result.counts()['image_entries']} image entries"
    )
    _save(result, args.output or args.bank)
    return 0


# ---------------------------------------------------------------------- mrad calibrate
def cmd_calibrate(args) -> int:
    from ..tools.calibration import apply_calibration, calibrate

    bank = _load_bank(args.bank) if args.bank else None
    detector = _detector(args, bank)
    if not detector.config.image_bank_size:
        raise _cli.CLIError("The model has no memory bank: pass --bank FILE or a --model saved with a bank.")
    defects, masks = None, None
    if args.dataset:
        rows = _samples(args)
        normals = [row["image"] for row in rows if int(row["label"]) == 0]
        defect_rows = [row for row in rows if int(row["label"]) == 1]
        defects, masks = [row["image"] for row in defect_rows], [row["mask"] for row in defect_rows]
    else:
        normals = [str(path) for path in _cli._collect_images(args.images or [])]
    if not normals:
        raise _cli.CLIError(
            "No known-good images: pass them with --images (files or folders) or a --dataset with a good/ folder."
        )
    _cli._log(
        f"Calibrating on {len(normals)} known-good image(s){f' and {len(defects)} known defect(s)' if defects else ''} for a false-positive rate of {args.target_fpr}"
    )
    calibration = calibrate(
        detector,
        normals,
        target_fpr=args.target_fpr,
        pixel_fpr=args.pixel_fpr,
        defect_images=defects,
        defect_masks=masks,
        batch_size=args.batch_size,
        on_error=getattr(args, "on_error", "skip"),
    )
    target_bank = bank if bank is not None or not args.bank_output else detector.get_memory_bank()
    apply_calibration(detector, calibration, bank=target_bank)
    _cli._log(
        f"image threshold {calibration['image_threshold']:.6f}, pixel threshold {calibration['pixel_threshold']:.6f}"
    )
    if calibration["defects"]:
        _cli._log(
            f"on the known defects: image recall {calibration['defects']['image_recall']:.3f}, pixel recall {calibration['defects']['pixel_recall']}"
        )
    # written only where asked: --output, inside --save-model (calibration.json), in --bank-output's metadata
    places = []
    if args.output:
        _cli._write_json(Path(args.output), calibration)
        places.append(str(args.output))
    if args.save_model:
        from ..memory.files import save_model

        save_model(detector, args.save_model)
        places.append(str(Path(args.save_model) / "calibration.json"))
        _cli._log(
            f"Calibrated model saved to {args.save_model}: pipeline('anomaly-detection') now returns is_anomalous and mask"
        )
    if args.bank_output:
        _save(target_bank, args.bank_output)
        places.append(f"the metadata of {args.bank_output}")
    if places:
        _cli._log(f"Calibration written to {', '.join(places)}")
    else:
        _cli._log(
            "The calibration was not saved (nothing asked for it): pass --save-model DIR (the model with its "
            "thresholds), --output FILE (JSON) or --bank-output FILE, or use the image threshold above as --threshold."
        )
    skipped = calibration["skipped_files"]
    _cli._report_skipped(skipped, f"'skipped_files' in {places[0]}" if places else "the lines below")
    for failure in [] if places else skipped[1:]:
        _cli._log(f"  skipped {failure['path']}: {failure['error']}")
    return 0


# ---------------------------------------------------------------------- mrad explain
def cmd_explain(args) -> int:
    from tqdm.auto import tqdm

    from ..tools.app import detector_for
    from ..tools.explain import public_explanation, save_explanation

    bank = _load_bank(args.bank) if args.bank else None
    detector = _detector(args, bank)
    detect = detector_for(detector)
    output_dir = Path(args.output_dir)
    records, notes = [], []
    from ..memory.building import random_backbone

    random_name = random_backbone(detector)
    paths = _cli._collect_images(args.images, output_dir=output_dir)
    for index, path in enumerate(tqdm(paths, desc="Explaining", unit="img")):
        image = detect.image_processor.load(path)
        result = detect(image, explain=True, top_k=args.top_k, threshold=args.threshold)
        panel = save_explanation(
            output_dir / f"{index:05d}_{path.stem}_explanation.png",
            image,
            result["anomaly_map"],
            result["explanation"],
            image_root=args.image_root,
            notes=notes,
        )
        record = {
            "path": str(path),
            "score": result["score"],
            "panel": str(panel),
            "explanation": public_explanation(result["explanation"]),
        }
        if "is_anomalous" in result:
            record.update(is_anomalous=bool(result["is_anomalous"]), thresholds=result["thresholds"])
        if random_name:
            record["random_backbone"] = random_name  # the explanation retrieves from random features
        records.append(record)
        top = result["explanation"]["image"]["neighbours"][0]
        _cli._log(
            f"{_cli.score_text(result)}  {path}  nearest: {top['kind']} ({'anomaly' if top['label'] else 'normal'}) {top['image_id']} from {top['source']}"
        )
    _cli._write_json(output_dir / "explanations.json", records)
    _cli._log(f"Panels and explanations.json in {output_dir}")
    if notes:
        _cli._log(f"{len(notes)} thumbnail(s) drawn as placeholders, e.g. {notes[0]}")
    elif args.image_root is None:
        _cli._log(
            "Memory entries are drawn as placeholders: pass --image-root (the folder the bank's image ids are relative to) for thumbnails."
        )
    return 0


# ---------------------------------------------------------------------- mrad serve
def cmd_serve(args) -> int:
    from ..tools.app import import_gradio, serve

    import_gradio()  # fail with the install hint before loading a model
    bank = _load_bank(args.bank) if args.bank else None
    detector = _detector(args, bank)
    _cli._log(f"Serving on http://{args.host}:{args.port}/ (Ctrl+C stops)")
    serve(
        detector,
        host=args.host,
        port=args.port,
        top_k=args.top_k,
        threshold=args.threshold,
        image_root=args.image_root,
        max_upload_mb=args.max_upload_mb,
    )
    return 0


# ---------------------------------------------------------------------- parser
def _sample_options(sub) -> None:
    _cli.dataset_options(sub, "a loader name for labelled images", required=False)
    sub.add_argument("--images", nargs="+", help="image files and/or folders")


#: the bank tools' near-duplicate rule (`memory.tools.DEFAULT_DEDUP_THRESHOLD`, repeated here so that building
#: the parser imports no torch; tests/cli checks the two agree)
DEFAULT_DEDUP_THRESHOLD = 0.999


def _dedup_options(sub) -> None:
    sub.add_argument(
        "--dedup",
        type=unit_interval,
        default=DEFAULT_DEDUP_THRESHOLD,
        help="drop same-label entries whose cosine similarity is above this",
    )
    sub.add_argument("--no-dedup", action="store_true", help="keep near-identical entries")


def _threshold_option(sub) -> None:
    sub.add_argument(
        "--threshold", type=image_threshold, help="image threshold (default: the model's calibration, if any)"
    )


def register(commands) -> None:
    """Add `bank`, `calibrate`, `explain` and `serve` to the `mrad` subcommand parser."""
    bank = commands.add_parser("bank", help="living memory banks: info, add images, merge, remove a source")
    actions = bank.add_subparsers(dest="bank_command", required=True, metavar="<action>")

    info = actions.add_parser("info", help="entries per source and kind, backbone, feature settings, history")
    info.add_argument("bank", help="a bank .safetensors file")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.set_defaults(handler=cmd_bank_info)

    add = actions.add_parser("add", help="add labelled images (with or without masks) to a bank, no training")
    add.add_argument("bank", help="the bank file to extend")
    model_options(add, bank=False)
    _sample_options(add)
    add.add_argument("--label", choices=("normal", "anomaly"), help="label of all --images")
    add.add_argument(
        "--masks",
        nargs="+",
        help="defect masks for --images (files or folders), paired by file stem (<stem>_mask.png beside an image is found without it)",
    )
    add.add_argument("--source", required=True, help="name of the new entries' source (used to list or remove them)")
    add.add_argument("--output", help="write here instead of replacing the bank file")
    _dedup_options(add)
    add.set_defaults(handler=cmd_bank_add)

    merge = actions.add_parser("merge", help="merge compatible banks (same backbone and feature settings)")
    merge.add_argument("banks", nargs="+", help="bank files, the first one's entries win near-duplicates")
    merge.add_argument("--output", required=True, help="the merged bank file")
    _dedup_options(merge)
    merge.set_defaults(handler=cmd_bank_merge)

    remove = actions.add_parser("remove", help="remove every entry of one or more sources")
    remove.add_argument("bank", help="a bank .safetensors file")
    remove.add_argument(
        "--source", nargs="+", required=True, help="the source name(s) to remove (see `mrad bank info`)"
    )
    remove.add_argument("--output", help="write here instead of replacing the bank file")
    remove.set_defaults(handler=cmd_bank_remove)

    calibrate = commands.add_parser(
        "calibrate", help="choose image and pixel thresholds for a target false-positive rate"
    )
    model_options(calibrate)
    _sample_options(calibrate)
    calibrate.add_argument("--target-fpr", type=probability, default=0.05, help="share of good images flagged")
    calibrate.add_argument(
        "--pixel-fpr", type=probability, help="share of good pixels in the mask (default: min(target, 0.01))"
    )
    calibrate.add_argument(
        "--output",
        help="also write the thresholds to this JSON file (--save-model keeps them in its calibration.json)",
    )
    calibrate.add_argument("--save-model", help="save the model with its calibration (and bank) to this folder")
    calibrate.add_argument("--bank-output", help="also write the bank with the calibration in its metadata")
    calibrate.set_defaults(handler=cmd_calibrate)

    explain = commands.add_parser(
        "explain", help="the memory entries behind each image's score and most anomalous region, as PNG panels"
    )
    model_options(explain)
    explain.add_argument("images", nargs="+", help="image files and/or folders")
    explain.add_argument("--output-dir", default="outputs/explain", help="where the panels and explanations.json go")
    explain.add_argument("--top-k", type=positive_int, default=5, help="memory entries shown per image")
    _threshold_option(explain)
    explain.add_argument(
        "--image-root", help="folder the bank's image ids are relative to; thumbnails are read only from inside it"
    )
    explain.set_defaults(handler=cmd_explain)

    serve = commands.add_parser(
        "serve", help="demo app: drop an image, see score, heatmap, decision, explanation (needs gradio)"
    )
    model_options(serve, batch_size=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=port_int, default=7860, help="port to listen on")
    serve.add_argument("--top-k", type=positive_int, default=5, help="memory entries shown per image")
    _threshold_option(serve)
    serve.add_argument(
        "--image-root", help="folder the bank's image ids are relative to; thumbnails are read only from inside it"
    )
    serve.add_argument(
        "--max-upload-mb",
        type=_cli._bounded(float, "a number of megabytes > 0", low=0, low_open=True),
        default=50.0,
        help="largest accepted upload in MB (default %(default)s)",
    )
    serve.set_defaults(handler=cmd_serve)
