# SPDX-License-Identifier: Apache-2.0
"""mrad-hf: MRAD zero-shot anomaly detection (Xu et al., ICLR 2026, arXiv 2602.00522) on Hugging Face.

Importing the package registers `MRADConfig` with `AutoConfig`, `MRADForAnomalyDetection` with `AutoModel`,
`MRADImageProcessor` with `AutoImageProcessor` and the `"anomaly-detection"` pipeline task, so that

    import mrad_hf
    from transformers import AutoModel, pipeline
    model = AutoModel.from_pretrained("path/to/mrad-model")
    detector = pipeline("anomaly-detection", model="path/to/mrad-model")

work without remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.auto import image_processing_auto as _auto_image_processing
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import is_torchvision_available

from .models.mrad.configuration_mrad import MRADConfig
from .models.mrad.image_processing_mrad import (
    SUPPORTED_IMAGE_EXTENSIONS,
    MRADImageProcessor,
    MRADImageProcessorFast,
    MRADInputError,
    load_image,
)
from .models.mrad.memory_bank_mrad import MemoryBank, MemoryBankError
from .models.mrad.modeling_mrad import MRADForAnomalyDetection, MRADOutput, MRADPreTrainedModel
from .models.mrad.pipeline_anomaly_detection import AnomalyDetectionPipeline

__version__ = "0.1.0"

__all__ = [
    "AnomalyDetectionPipeline",
    "MRADConfig",
    "MRADForAnomalyDetection",
    "MRADImageProcessor",
    "MRADImageProcessorFast",
    "MRADInputError",
    "MRADOutput",
    "MRADPreTrainedModel",
    "MemoryBank",
    "MemoryBankError",
    "SUPPORTED_IMAGE_EXTENSIONS",
    "load_image",
    "__version__",
]

AutoConfig.register("mrad", MRADConfig, exist_ok=True)
AutoModel.register(MRADConfig, MRADForAnomalyDetection, exist_ok=True)
# The PIL backend is the reference preprocessing (bit-exact); the torchvision one only where torchvision imports, and
# only on request (`backend="torchvision"`): its bicubic differs slightly, so it is kept off the default path.
AutoImageProcessor.register(
    MRADConfig,
    image_processor_classes={"pil": MRADImageProcessor, **({"torchvision": MRADImageProcessorFast} if is_torchvision_available() else {})},
    exist_ok=True,
)
if "MRADImageProcessor" not in getattr(_auto_image_processing, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", ["MRADImageProcessor"]):
    _auto_image_processing.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS.append("MRADImageProcessor")
# Saved folders carry their code (auto_map), so they also load with trust_remote_code=True where mrad_hf is
# not installed; where it is installed, these local classes win.
MRADConfig.register_for_auto_class()
MRADForAnomalyDetection.register_for_auto_class("AutoModel")
MRADImageProcessor.register_for_auto_class()
PIPELINE_REGISTRY.register_pipeline(
    "anomaly-detection", pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, type="image"
)
