# SPDX-License-Identifier: Apache-2.0
"""mrad-hf: MRAD zero-shot anomaly detection (Xu et al., ICLR 2026, arXiv 2602.00522) on Hugging Face.

Importing the package registers `MRADConfig` with `AutoConfig`, `MRADForAnomalyDetection` with `AutoModel`,
`MRADImageProcessor` with `AutoImageProcessor` and the `"anomaly-detection"` pipeline task, so that

    import mrad_hf
    from transformers import AutoModel, pipeline
    model = AutoModel.from_pretrained("path/to/mrad-model")
    detector = pipeline("anomaly-detection", model="path/to/mrad-model")

work without remote code.

The import itself is cheap (no torch, no transformers), so that `mrad --help` answers at once: the public classes
load on first use (PEP 562 `__getattr__`), and the registration runs as soon as transformers is loaded, whoever
loads it. If transformers is already imported, it runs now; otherwise a one-shot import hook runs it right after
`transformers` (or an `mrad_hf` module that imported it) has finished loading, before user code can reach
`AutoModel` or `pipeline`.
"""

from __future__ import annotations

import importlib
import sys
import threading

__version__ = "0.1.0"

#: public name -> the module (relative to this package) that defines it; loaded on first attribute access
_LAZY_EXPORTS = {
    "AnomalyDetectionPipeline": ".models.mrad.pipeline_anomaly_detection",
    "MRADConfig": ".models.mrad.configuration_mrad",
    "MRADForAnomalyDetection": ".models.mrad.modeling_mrad",
    "MRADImageProcessor": ".models.mrad.image_processing_mrad",
    "MRADImageProcessorFast": ".models.mrad.image_processing_mrad",
    "MRADInputError": ".models.mrad.image_processing_mrad",
    "MRADOutput": ".models.mrad.modeling_mrad",
    "MRADPreTrainedModel": ".models.mrad.modeling_mrad",
    "MemoryBank": ".models.mrad.memory_bank_mrad",
    "MemoryBankError": ".models.mrad.memory_bank_mrad",
    "SUPPORTED_IMAGE_EXTENSIONS": ".models.mrad.image_processing_mrad",
    "build_memory_bank": ".memory.building",
    "load_image": ".models.mrad.image_processing_mrad",
    "set_backbone_dtype": ".runtime",
}

__all__ = sorted(_LAZY_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


# ---------------------------------------------------------------------- registration with transformers
_registration_lock = threading.RLock()
_registered = False
_registering = False


def register_with_transformers() -> None:
    """Register MRAD with AutoConfig / AutoModel / AutoImageProcessor and the `"anomaly-detection"` pipeline task.

    Idempotent; called automatically (see the module docstring), public for code that wants it explicitly.
    """
    global _registered, _registering
    with _registration_lock:
        if _registered or _registering:
            return
        _registering = True
        try:
            from transformers import AutoConfig, AutoImageProcessor, AutoModel
            from transformers.models.auto import image_processing_auto as auto_image_processing
            from transformers.pipelines import PIPELINE_REGISTRY
            from transformers.utils import is_torchvision_available

            from .models.mrad.configuration_mrad import MRADConfig
            from .models.mrad.image_processing_mrad import MRADImageProcessor, MRADImageProcessorFast
            from .models.mrad.modeling_mrad import MRADForAnomalyDetection
            from .models.mrad.pipeline_anomaly_detection import AnomalyDetectionPipeline

            AutoConfig.register("mrad", MRADConfig, exist_ok=True)
            AutoModel.register(MRADConfig, MRADForAnomalyDetection, exist_ok=True)
            # The PIL backend is the reference preprocessing (bit-exact); the torchvision one only where torchvision
            # imports, and only on request (`backend="torchvision"`): its bicubic differs slightly.
            backends = {"pil": MRADImageProcessor}
            if is_torchvision_available():
                backends["torchvision"] = MRADImageProcessorFast
            AutoImageProcessor.register(MRADConfig, image_processor_classes=backends, exist_ok=True)
            pil_default = getattr(auto_image_processing, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None)
            if pil_default is not None and "MRADImageProcessor" not in pil_default:
                pil_default.append("MRADImageProcessor")
            # Saved folders carry their code (auto_map), so they also load with trust_remote_code=True where mrad_hf
            # is not installed; where it is installed, these local classes win.
            MRADConfig.register_for_auto_class()
            MRADForAnomalyDetection.register_for_auto_class("AutoModel")
            MRADImageProcessor.register_for_auto_class()
            PIPELINE_REGISTRY.register_pipeline(
                "anomaly-detection", pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, type="image"
            )
            _registered = True
        finally:
            _registering = False
        _RegisterAfterImport.uninstall()


def _own_module_loading() -> bool:
    """Whether an `mrad_hf` module is still executing (registering now would import it half-initialised)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(__name__ + ".") and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def _maybe_register() -> None:
    if not _registered and "transformers" in sys.modules and not _own_module_loading():
        register_with_transformers()


class _LoaderThatRegisters:
    """Wraps a module's loader: after the module has executed, register with transformers if it is time."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__spec__._initializing = False  # the module is complete; importlib clears it again right after
        _maybe_register()

    def __getattr__(self, name):  # get_resource_reader, get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterAfterImport:
    """A `sys.meta_path` finder that wraps the loaders of `transformers` and of this package's modules."""

    _busy = False

    @classmethod
    def install(cls) -> None:
        if not any(finder is cls for finder in sys.meta_path):
            sys.meta_path.insert(0, cls)

    @classmethod
    def uninstall(cls) -> None:
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if cls._busy or _registered or not (name == "transformers" or name.startswith(__name__ + ".")):
            return None
        cls._busy = True
        try:
            for finder in sys.meta_path:
                if finder is cls or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _LoaderThatRegisters(spec.loader)
                    return spec
            return None
        finally:
            cls._busy = False


if "transformers" in sys.modules:
    register_with_transformers()
else:
    _RegisterAfterImport.install()
