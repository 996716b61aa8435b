# SPDX-License-Identifier: Apache-2.0
"""`mrad export`: write a saved MRAD model (with its memory bank) as an ONNX or OpenVINO folder (see `mrad_hf.export`).

    mrad export --model models/mrad-tf-visa --format onnx --output exports/mrad-tf-visa-onnx
    mrad export --model models/mrad-clip-visa --format openvino --output exports/mrad-clip-visa-openvino
    mrad export --model models/mrad-tf-visa --format openvino --precision bfloat16 --output exports/tf-ov-bf16

The graph takes `pixel_values` (batch, 3, S, S) from the folder's `preprocessor_config.json` and returns
`anomaly_map` (batch, S, S) and `anomaly_score` (batch,), with the bank, the post-processing and (MRAD-CLIP) the text
branch inside. It is checked against the PyTorch model at batch 1 and 3 before the folder is written.
"""

from __future__ import annotations

import json

from . import common as _cli

__all__ = ["register", "cmd_export"]


def cmd_export(args) -> int:
    from ..export import ExportError, export_model
    from ..export.exporters import check_export_request

    try:  # before the model loads: a wrong --precision or --output fails at once
        check_export_request(args.output, format=args.format, precision=args.precision)
    except ExportError as error:
        raise _cli.CLIError(str(error)) from error
    detector = _cli.load_detector(args.model, None).eval()
    _cli._log(
        f"Exporting MRAD-{detector.config.variant.upper()} to {args.format} ({args.precision}); "
        "this traces the whole model once"
    )
    try:
        folder = export_model(
            detector,
            args.output,
            format=args.format,
            precision=args.precision,
            opset=args.opset,
            verify_batch_sizes=tuple(args.verify_batch_sizes),
            threads=args.threads,
        )
    except ExportError as error:
        raise _cli.CLIError(str(error)) from error
    record = json.loads((folder / "export_config.json").read_text(encoding="utf-8"))
    for batch, diffs in (record.get("verification") or {}).items():
        if batch.startswith("batch_"):
            _cli._log(
                f"  {batch.replace('_', ' ')}: max |diff| vs PyTorch  map {diffs['max_abs_diff_map']:.2e}  "
                f"score {diffs['max_abs_diff_score']:.2e}"
            )
    _cli._log(f"Wrote {folder}/{record['file']}; run it with mrad_hf.export.ExportedDetector('{folder}')")
    return 0


def register(commands) -> None:
    """Add `export` to the `mrad` subcommand parser."""
    parser = commands.add_parser(
        "export", help="export a saved MRAD model to ONNX or OpenVINO (dynamic batch, bank and post-processing inside)"
    )
    parser.add_argument("--model", required=True, help="a saved MRAD model folder or Hub id (with its memory bank)")
    parser.add_argument(
        "--format", required=True, choices=("onnx", "openvino"), help="onnx (ONNX Runtime, OpenVINO) or openvino (IR)"
    )
    parser.add_argument("--output", required=True, help="folder to write (new, empty, or an earlier export)")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16"),
        help="what the runtime computes in (not the CLIP tower's --dtype of the other commands; the graph stays "
        "float32): float32 (default, equal to PyTorch within 1e-4) or bfloat16 (openvino only; pays only on "
        "CPUs with AVX512-BF16/AMX)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--verify-batch-sizes",
        type=int,
        nargs="*",
        default=[1, 3],
        metavar="B",
        help="batch sizes checked against the PyTorch model before writing (default 1 3; none to skip)",
    )
    parser.add_argument("--threads", type=int, help="runtime threads for the check (default: all cores)")
    parser.set_defaults(handler=cmd_export)
