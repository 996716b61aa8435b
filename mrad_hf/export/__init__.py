# SPDX-License-Identifier: Apache-2.0
"""Export for deployment (layer 2): MRAD as one ONNX / OpenVINO graph with a dynamic batch axis, and the ONNX Runtime
and OpenVINO detectors that run it with the PyTorch model's inputs and outputs.

    mrad export --model models/mrad-tf-visa --format onnx --output exports/mrad-tf-visa-onnx
    detector = ExportedDetector("exports/mrad-tf-visa-onnx"); detector(**detector.processor(images)).anomaly_map

The runtimes are optional: `pip install 'mrad-hf[onnx]'` (onnx, onnxscript, onnxruntime), `'mrad-hf[openvino]'`.
"""

from .exporters import EXPORT_FORMATS, export_model, export_onnx
from .graph import MRADExportModule
from .runtime import BACKENDS, ExportedDetector, ExportError, OnnxRuntimeDetector, OpenVINODetector

__all__ = [
    "BACKENDS",
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedDetector",
    "MRADExportModule",
    "OnnxRuntimeDetector",
    "OpenVINODetector",
    "export_model",
    "export_onnx",
]
