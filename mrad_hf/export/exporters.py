# SPDX-License-Identifier: Apache-2.0
"""Write an MRAD model as an ONNX or OpenVINO folder with a dynamic batch axis, verified against PyTorch.

    from mrad_hf.export import export_model
    export_model(model, "exports/mrad-tf-visa-onnx", format="onnx")        # model.onnx (+ model.onnx.data)
    export_model(model, "exports/mrad-tf-visa-openvino", format="openvino")  # model.xml + model.bin

An export folder holds the graph (the model's own forward, `MRADExportModule`: pixels -> anomaly_map (B, S, S),
anomaly_score (B,); CLIP weights, heads and memory bank as constants; upsampling, blur and score fusion in the graph),
`preprocessor_config.json` (the model's `MRADImageProcessor`, so that the runtime preprocesses identically) and
`export_config.json` (format, variant, sizes, the bank it embeds, versions, and the measured difference to the
PyTorch model at two batch sizes). ONNX comes from `torch.onnx.export(dynamo=True)` (the torch.export-based exporter);
OpenVINO converts that ONNX graph with `openvino.convert_model` and stores its weights in float32 (OpenVINO's default
would round them to float16).

An export whose outputs differ from the PyTorch model by more than `tolerance` is refused, not written.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..memory.files import FolderKind, atomic_directory, check_output_folder
from ..models.mrad.image_processing_mrad import MRADImageProcessor
from .graph import INPUT_NAME, OUTPUT_NAMES, MRADExportModule
from .runtime import EXPORT_CONFIG_NAME, ExportedDetector, ExportError, require

__all__ = ["EXPORT_FORMATS", "check_export_request", "export_model", "export_onnx"]

EXPORT_FORMATS = ("onnx", "openvino")
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
#: What an export folder is: recognised by its export_config.json; the files an export writes (user files are kept).
EXPORT_FOLDER = FolderKind(
    "an MRAD export folder",
    lambda folder: (folder / EXPORT_CONFIG_NAME).is_file(),
    (ONNX_FILE, f"{ONNX_FILE}.data", OPENVINO_FILE, "model.bin", EXPORT_CONFIG_NAME, "preprocessor_config.json"),
)
#: default opset of the exported graph (torch.onnx's dynamo exporter translates to 18 and up)
DEFAULT_OPSET = 18
#: per runtime precision: the agreement with the PyTorch model that an export must reach to be written
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def _random_pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def export_onnx(
    module: MRADExportModule, path: str | Path, *, opset: int = DEFAULT_OPSET, example_batch: int = 2
) -> Path:
    """Export `module` to `path` (a `.onnx` file; weights in `<path>.data` beside it) with a dynamic batch axis."""
    require("onnx")
    require("onnxscript")
    path = Path(path)
    size = module.config.image_size
    example = _random_pixels(example_batch, size).to(next(module.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.onnx internals (pytree spec deprecation)
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    return path


def _export_openvino(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> Path:
    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    model.reshape({INPUT_NAME: [-1, 3, *model.input(INPUT_NAME).get_partial_shape()[2:]]})  # keep the batch dynamic
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path


def _check_output_folder(path: Path) -> None:
    """Refuse a folder where an export would overwrite files it did not write (`memory.files.check_output_folder`)."""
    try:
        check_output_folder(path, EXPORT_FOLDER)
    except FileExistsError as error:
        raise ExportError(str(error)) from error


def check_export_request(output_dir: str | Path, *, format: str, precision: str) -> Path:
    """Refuse (ExportError) an unknown format or precision, bfloat16 outside OpenVINO, or an output folder an
    export may not write to; returns the folder. `export_model` starts with it, and `mrad export` calls it before
    loading the model, so a wrong command line fails at once, not after the model has loaded."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    if precision not in DEFAULT_TOLERANCE:
        raise ExportError(f"Unsupported export precision {precision!r}; use one of {', '.join(DEFAULT_TOLERANCE)}.")
    if precision == "bfloat16" and format != "openvino":
        raise ExportError(
            "--precision bfloat16 needs --format openvino (ONNX Runtime's CPU provider computes in float32)."
        )
    _check_output_folder(Path(output_dir))
    return Path(output_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino", "mrad-hf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def export_model(
    model,
    output_dir: str | Path,
    *,
    format: str = "onnx",
    precision: str = "float32",
    opset: int = DEFAULT_OPSET,
    verify_batch_sizes: tuple[int, ...] = (1, 3),
    tolerance: float | None = None,
    threads: int | None = None,
) -> Path:
    """Export an `MRADForAnomalyDetection` (with its memory bank) to `output_dir` as ONNX or OpenVINO.

    Args:
        model: the model to export, with its CLIP tower in float32; it is not modified.
        output_dir: the folder to write; created, or replaced if it holds an earlier export. Written atomically.
        format: "onnx" or "openvino".
        precision: what the runtime computes in. The graph and its weights are always float32 (the bank,
            retrieval and maps stay float32 at run time too). "float32" (default): equal to PyTorch within 1e-4.
            "bfloat16" (OpenVINO only): stored as the runtime's default `inference_precision`, so OpenVINO's CPU
            plugin runs the matrix products in bf16; it pays only on CPUs with AVX512-BF16 or AMX (measure with
            benchmarks/benchmark_export.py). ONNX Runtime's CPU provider has no bf16 kernels.
        opset: ONNX opset.
        verify_batch_sizes: batch sizes at which the exported graph is run and compared with the PyTorch model
            (random pixels); the results are stored in `export_config.json`. Empty: no check.
        tolerance: largest accepted max |diff| of map and score (default 1e-4 for float32, 5e-2 for bfloat16).
        threads: threads of the verification runtime (default: the runtime's own).

    Returns: the folder.
    """
    output_dir = check_export_request(output_dir, format=format, precision=precision)
    backbone_dtype = next(model.clip.parameters()).dtype
    if backbone_dtype != torch.float32:
        raise ExportError(
            f"The model's CLIP tower is {backbone_dtype}; export it in float32 "
            "(precision= picks what the runtime computes in)."
        )
    model = model.eval()
    tolerance = DEFAULT_TOLERANCE[precision] if tolerance is None else tolerance
    config = model.config
    module = MRADExportModule(model).eval()
    with atomic_directory(output_dir, EXPORT_FOLDER) as staging:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a deployment folder gets the usual permissions
        if format == "onnx":
            export_onnx(module, staging / ONNX_FILE, opset=opset)
            graph_file = ONNX_FILE
        else:
            with tempfile.TemporaryDirectory(prefix=".mrad-onnx-", dir=staging.parent) as scratch:
                scratch_onnx = export_onnx(module, Path(scratch) / ONNX_FILE, opset=opset)
                _export_openvino(scratch_onnx, staging / OPENVINO_FILE)
            graph_file = OPENVINO_FILE
        MRADImageProcessor.from_config(config).save_pretrained(staging)
        in_graph = ["dual-path CLIP vision tower", "image and patch memory bank (constants)", "soft retrieval"]
        if config.variant == "clip":
            in_graph.append("MRAD-CLIP text branch (region priors -> prompt biases -> prompted text tower)")
        record: dict[str, Any] = {
            "format": format,
            "file": graph_file,
            "variant": config.variant,
            "image_size": config.image_size,
            "inference_precision": {"float32": "f32", "bfloat16": "bf16"}[precision],
            "opset": opset,
            "inputs": {INPUT_NAME: ["batch", 3, config.image_size, config.image_size]},
            "outputs": {OUTPUT_NAMES[0]: ["batch", config.image_size, config.image_size], OUTPUT_NAMES[1]: ["batch"]},
            "in_graph": in_graph + ["bilinear upsampling", "Gaussian blur", "score fusion"],
            "memory_bank": {
                "image_entries": int(model.memory.image_keys.shape[0]),
                "patch_entries": int(model.memory.patch_keys.shape[0]),
                "source": (model.memory_bank_metadata or {}).get("source"),
            },
            "versions": _versions(),
        }
        (staging / EXPORT_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if verify_batch_sizes:
            record["verification"] = _verify(model, staging, verify_batch_sizes, tolerance, threads)
            (staging / EXPORT_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return output_dir


def _verify(
    model, folder: Path, batch_sizes: tuple[int, ...], tolerance: float, threads: int | None
) -> dict[str, Any]:
    """Run the export and the PyTorch model on the same random pixels; raise ExportError beyond `tolerance`."""
    detector = ExportedDetector(folder, threads=threads)
    device = next(model.clip.parameters()).device
    results = {}
    for batch in batch_sizes:
        pixels = _random_pixels(batch, model.config.image_size, seed=batch)
        with torch.no_grad():
            expected = model(pixel_values=pixels.to(device))
        got = detector(pixel_values=pixels)
        map_diff = float((got.anomaly_map - expected.anomaly_map.float().cpu()).abs().max())
        score_diff = float((got.anomaly_score - expected.anomaly_score.float().cpu()).abs().max())
        results[f"batch_{batch}"] = {"max_abs_diff_map": map_diff, "max_abs_diff_score": score_diff}
        if not map_diff <= tolerance or not score_diff <= tolerance:  # also catches NaN
            raise ExportError(
                f"The exported graph differs from the PyTorch model at batch {batch} (max |diff| map {map_diff:.3g}, "
                f"score {score_diff:.3g} > {tolerance:g}); nothing was written. Report this with `pip list` output."
            )
    return {"random_pixels": True, "tolerance": tolerance, **results}
