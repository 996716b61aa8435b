# SPDX-License-Identifier: Apache-2.0
"""Run an exported MRAD folder with ONNX Runtime or OpenVINO, with the PyTorch model's inputs and outputs.

    from mrad_hf.export import ExportedDetector
    detector = ExportedDetector("exports/mrad-tf-visa-onnx")            # backend from the folder
    outputs = detector(**detector.processor(images))                   # same processor inputs as the model
    outputs.anomaly_map, outputs.anomaly_score                          # torch tensors (B, S, S), (B,)
    outputs = detector.predict(["a.png", "b.png"], batch_size=8)        # decode, preprocess, batch, run

`OnnxRuntimeDetector` and `OpenVINODetector` are the same class with the backend fixed. An ONNX folder runs on
either backend (OpenVINO reads ONNX); an OpenVINO folder needs OpenVINO. OpenVINO's CPU plugin is pinned to float32
(`inference_precision="f32"`) unless the export or the caller asks for "bf16": left alone it picks bf16 by itself
on AMX CPUs, which would silently change the outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.mrad.image_processing_mrad import MRADImageProcessor
from ..models.mrad.modeling_mrad import MRADOutput
from .graph import INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "BACKENDS",
    "EXPORT_CONFIG_NAME",
    "ExportError",
    "ExportedDetector",
    "OnnxRuntimeDetector",
    "OpenVINODetector",
    "require",
]

BACKENDS = ("onnxruntime", "openvino")
EXPORT_CONFIG_NAME = "export_config.json"
INFERENCE_PRECISIONS = ("f32", "bf16")
_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


class ExportError(RuntimeError):
    """An export that cannot be done or would not be faithful (the message says what to change)."""


def require(module: str):
    """Import an optional runtime dependency, or fail with the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = _EXTRAS.get(module.split(".")[0], module)
        raise ExportError(
            f"{module} is not installed ({error}); install it with: pip install 'mrad-hf[{extra}]'"
        ) from error


def _read_export_config(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_CONFIG_NAME
    if not path.is_file():
        raise ExportError(
            f"'{folder}' has no {EXPORT_CONFIG_NAME}; it is not an MRAD export (create one with `mrad export`)."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"Could not read '{path}' ({error}); re-run `mrad export` to rewrite the folder.") from error
    file_name = record.get("file")
    if not isinstance(file_name, str) or Path(file_name).name != file_name or not (folder / file_name).is_file():
        raise ExportError(
            f"'{path}' names the graph file {file_name!r}, which is not in '{folder}'; re-run `mrad export`."
        )
    return record


class ExportedDetector:
    """An exported MRAD graph behind the model's interface: `detector(pixel_values=...) -> MRADOutput`.

    Args:
        folder: an `mrad export` folder (`export_config.json`, the graph, `preprocessor_config.json`).
        backend: "onnxruntime" or "openvino"; default: the one the folder was exported for.
        threads: intra-op threads (default: the runtime's own choice, all cores).
        inference_precision: OpenVINO only: "f32" or "bf16" (default: what the export recorded, normally "f32").
        device: OpenVINO device (default "CPU").
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str | None = None,
        threads: int | None = None,
        inference_precision: str | None = None,
        device: str = "CPU",
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ExportError(f"'{self.folder}' is not a folder; pass the output folder of `mrad export`.")
        self.export_config = _read_export_config(self.folder)
        exported_format = self.export_config.get("format")
        backend = backend or ("openvino" if exported_format == "openvino" else "onnxruntime")
        if backend not in BACKENDS:
            raise ExportError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
        if backend == "onnxruntime" and exported_format != "onnx":
            raise ExportError(
                f"'{self.folder}' is an {exported_format} export; ONNX Runtime runs ONNX exports "
                "(use backend='openvino')."
            )
        self.backend = backend
        self.graph_path = self.folder / self.export_config["file"]
        self.processor = MRADImageProcessor.from_pretrained(self.folder)
        self.image_size = int(self.export_config["image_size"])
        if backend == "onnxruntime":
            if inference_precision not in (None, "f32"):
                raise ExportError(
                    "ONNX Runtime's CPU provider computes in float32; inference_precision must be 'f32'."
                )
            self.inference_precision = "f32"
            self._run = self._onnxruntime_runner(threads)
        else:
            precision = inference_precision or self.export_config.get("inference_precision", "f32")
            if precision not in INFERENCE_PRECISIONS:
                raise ExportError(
                    f"Unknown inference_precision {precision!r}; use one of {', '.join(INFERENCE_PRECISIONS)}."
                )
            self.inference_precision = precision
            self._run = self._openvino_runner(threads, precision, device)

    def _onnxruntime_runner(self, threads: int | None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = session = ort.InferenceSession(
            str(self.graph_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            return session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values})

        return run

    def _openvino_runner(self, threads: int | None, precision: str, device: str):
        ov = require("openvino")
        core = ov.Core()
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled_model = compiled = core.compile_model(core.read_model(str(self.graph_path)), device, properties)
        outputs = [compiled.output(name) for name in OUTPUT_NAMES]
        request = compiled.create_infer_request()

        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            results = request.infer({INPUT_NAME: pixel_values})
            return [np.array(results[output]) for output in outputs]  # copies: the request's buffers are reused

        return run

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, **kwargs) -> MRADOutput:
        """Score a (B, 3, S, S) batch from `processor(images)`; `original_sizes` is ignored, as the model does."""
        kwargs.pop("original_sizes", None)
        if kwargs:
            raise TypeError(f"ExportedDetector got unexpected arguments: {sorted(kwargs)}")
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().float().numpy()
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        size = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(
                f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "preprocess with detector.processor."
            )
        anomaly_map, anomaly_score = self._run(pixel_values)
        return MRADOutput(anomaly_map=torch.from_numpy(anomaly_map), anomaly_score=torch.from_numpy(anomaly_score))

    def predict(self, images: Sequence[Any], *, batch_size: int = 8) -> MRADOutput:
        """Decode and preprocess `images` (paths, PIL images, arrays) in batches and score them."""
        maps, scores = [], []
        images = list(images)
        for start in range(0, len(images), batch_size):
            output = self(**self.processor(images[start : start + batch_size]))
            maps.append(output.anomaly_map)
            scores.append(output.anomaly_score)
        return MRADOutput(anomaly_map=torch.cat(maps), anomaly_score=torch.cat(scores))

    def __repr__(self) -> str:
        name = type(self).__name__
        precision = self.inference_precision
        return f"{name}(folder='{self.folder}', backend={self.backend!r}, inference_precision={precision!r})"


class OnnxRuntimeDetector(ExportedDetector):
    """`ExportedDetector` on ONNX Runtime (an ONNX export folder)."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        super().__init__(folder, backend="onnxruntime", threads=threads)


class OpenVINODetector(ExportedDetector):
    """`ExportedDetector` on OpenVINO (an OpenVINO or an ONNX export folder)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        threads: int | None = None,
        inference_precision: str | None = None,
        device: str = "CPU",
    ):
        super().__init__(
            folder, backend="openvino", threads=threads, inference_precision=inference_precision, device=device
        )
