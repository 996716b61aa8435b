# SPDX-License-Identifier: Apache-2.0
"""MRAD's two-level memory bank and its integrity checks, as a saved model needs them (paper Sec. 3.2).

* Image level: keys = L2-normalised projected class tokens of the auxiliary images (N_c x P), values = one-hot
  labels (`LABEL_CONVENTION`: column 0 normal, column 1 anomaly).
* Pixel level: keys = L2-normalised region prototypes (N_p x W): per auxiliary image, the mean neighbour-averaged
  V-V token over its anomalous patches and over its normal patches; values one-hot; `patch_sources` = image entry.

A bank is only meaningful for the backbone and feature settings that built it: its metadata (`memory_bank.json` in a
model folder) records them (`backbone_fingerprint`, `feature_settings`), the source, counts and per-image provenance
(`PER_IMAGE_FIELDS`, never absolute paths), with SHA-256 seals of the tensors and of each answer-changing field
(`SEALED_FIELDS`). `verify_model_memory` (run by `from_pretrained`) refuses a model whose buffers, sealed fields,
backbone or feature settings no longer match, naming the field. Bank building, files and tools: `mrad_hf.memory`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BANK_FORMAT_VERSION",
    "MemoryBank",
    "MemoryBankError",
    "backbone_fingerprint",
    "check_model_bank",
    "feature_settings",
    "tensors_checksum",
    "validate_calibration",
    "verify_model_memory",
]

BANK_FORMAT_VERSION = 2  # 2: dtype-independent backbone signature, sealed metadata fields
MODEL_BANK_FILENAME = "memory_bank.json"
#: Metadata fields that change an answer: each has its own SHA-256 in `metadata["metadata_sha256"]`.
SEALED_FIELDS = ("backbone", "features", "label_convention", "counts", "calibration")
#: Per-image-entry provenance lists, aligned with the image keys (read by `mrad_hf.memory.tools.provenance`).
PER_IMAGE_FIELDS = ("image_ids", "image_sources", "image_sha256")
_TENSOR_NAMES = ("image_keys", "image_values", "patch_keys", "patch_values", "patch_sources")
LABEL_CONVENTION = "values[:, 0] = normal, values[:, 1] = anomaly"
_EDIT_HINT = "Rebuild the bank, or edit it only with `mrad bank` / mrad_hf.memory.tools."
#: Largest difference of two signature entries (RMS relative, projections absolute) of one backbone's casts.
SIGNATURE_TOLERANCE = 0.05


class MemoryBankError(ValueError):
    """A memory bank that is missing, malformed, or built for another backbone; the message says what to do."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a bank's tensors (floats as float32, indices as int64)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32 if tensors[name].is_floating_point() else torch.int64)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _sealed_checksums(metadata: dict[str, Any]) -> dict[str, str]:
    return {
        name: hashlib.sha256(json.dumps(metadata[name], sort_keys=True, allow_nan=True).encode()).hexdigest()
        for name in SEALED_FIELDS
        if metadata.get(name) is not None
    }


def verify_seal(stored: dict[str, Any], bank: MemoryBank, origin: str) -> None:
    """Refuse a bank whose tensors or sealed fields differ from the checksums recorded at its save: `stored` is the
    metadata as read (empty: none recorded), `bank` the bank rebuilt from it. Every format records its version, format
    2 both checksums; format 1 only the tensors' (and, written before checksums existed, none)."""
    version = stored.get("format_version")
    if stored and (type(version) is not int or not 1 <= version <= BANK_FORMAT_VERSION):
        raise MemoryBankError(
            f"{origin}: format_version {version!r} is not a format this mrad_hf reads (integers 1 to "
            f"{BANK_FORMAT_VERSION}); rebuild the bank, or upgrade mrad_hf if a newer version wrote it."
        )
    for kind in ("tensors", "metadata") if stored and version >= 2 else ():
        if stored.get(f"{kind}_sha256") is None:
            raise MemoryBankError(f"{origin}: the {kind} checksums ('{kind}_sha256') were removed; rebuild the bank.")
    if stored.get("tensors_sha256") not in (None, bank.metadata["tensors_sha256"]):
        raise MemoryBankError(
            f"{origin} is corrupt: its tensors do not match the SHA-256 recorded when it was saved (tensors and metadata "
            "from different saves, or edited/damaged on disk). Rebuild or re-download it."
        )
    if stored.get("counts") is not None and stored["counts"] != bank.counts():
        raise MemoryBankError(f"{origin}: metadata field 'counts' was edited ({stored['counts']} vs {bank.counts()}).")
    recorded = stored.get("metadata_sha256")
    actual = _sealed_checksums(stored)
    for name in SEALED_FIELDS if recorded is not None else ():
        if recorded.get(name) != actual.get(name):
            change = "removed" if name not in actual else ("added" if name not in recorded else "edited")
            raise MemoryBankError(
                f"{origin}: metadata field '{name}' was {change} after the bank was saved (its SHA-256 no longer matches); "
                "rebuild or re-download the bank, and edit banks only with `mrad bank` / mrad_hf.memory.tools."
            )


def validate_calibration(calibration: Any, origin: str = "calibration") -> dict[str, Any] | None:
    """A calibration dict with finite thresholds in the score range ([0, 2] image, [0, 1] pixel), or MemoryBankError."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise MemoryBankError(f"{origin}: a calibration must be a JSON object, got {type(calibration).__name__}.")
    for key, upper in (("image_threshold", 2.0), ("pixel_threshold", 1.0)):
        value = calibration.get(key)
        if value is None and key == "pixel_threshold":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
            raise MemoryBankError(  # NaN fails the range test, +-inf too
                f"{origin}: '{key}' is {value!r}; it must be a finite number in [0, {upper:g}] (scores are probabilities). "
                "Recalibrate with `mrad calibrate` or mrad_hf.tools.calibration.calibrate."
            )
    return dict(calibration)


def check_model_bank(model, bank: MemoryBank, *, strict: bool = True, trust_bank: bool = False) -> None:
    """`bank.check_compatible` with `model`'s backbone fingerprint and feature settings (format 1: float32 hash)."""
    fingerprint = backbone_fingerprint(model.clip)
    if "weights_signature" not in (bank.metadata.get("backbone") or {}):
        fingerprint["weights_sha256"] = _legacy_weights_sha256(model.clip)
    bank.check_compatible(fingerprint, feature_settings(model.config), strict=strict, trust_bank=trust_bank)


def verify_model_memory(model, *, trust_bank: bool = False) -> None:
    """Check that a loaded model's memory buffers are the bank its `memory_bank.json` describes, for its backbone:
    catches weights and sidecar from different saves, buffers or sealed fields edited, CLIP weights swapped."""
    config = model.config
    if config.image_bank_size or config.patch_bank_size:
        bank = model.get_memory_bank()
        counts = f"{config.image_bank_size} image / {config.patch_bank_size} patch entries"
        verify_seal(dict(model.memory.metadata or {}), bank, f"The model's memory bank ({counts})")
        check_model_bank(model, bank, trust_bank=trust_bank)


def _signature_tensors(clip_model: torch.nn.Module) -> list[torch.Tensor]:
    embeddings, norm = clip_model.vision_model.embeddings, clip_model.vision_model.post_layernorm
    patch, position = embeddings.patch_embedding.weight, embeddings.position_embedding.weight
    return [patch, embeddings.class_embedding, position, norm.weight, norm.bias, clip_model.visual_projection.weight]


def backbone_fingerprint(clip_model: torch.nn.Module) -> dict[str, Any]:
    """Identity of a CLIP backbone: its vision architecture and a dtype-independent signature of its weights.

    Per signature tensor (patch, class and position embeddings, final layer norm, visual projection): its RMS and 4
    normalised projections sqrt(n) <w / |w|, r_j> on fixed +-1 patterns (integer hash of the position, the same on
    every platform; about N(0, 1) for unrelated weights). A bf16/fp16 cast moves a projection by ~1e-3, another
    backbone by ~1, so signatures are compared with `SIGNATURE_TOLERANCE`: one bank serves every dtype of a backbone.
    """
    config = clip_model.config
    vision = config.vision_config
    signature = []
    for tensor in _signature_tensors(clip_model):
        flat = tensor.detach().to("cpu", torch.float64).flatten()
        norm = float(flat.norm()) or 1.0
        index = torch.arange(flat.numel(), dtype=torch.int64)
        signature.append(round(norm / math.sqrt(flat.numel()), 6))
        for row in range(4):
            pattern = (((index * 2654435761 + (row + 1) * 40503) >> 13) & 1).to(torch.float64) * 2 - 1
            signature.append(round(float(flat @ pattern) / norm, 4))
    return {
        "hidden_size": int(vision.hidden_size),
        "projection_dim": int(config.projection_dim),
        "num_hidden_layers": int(vision.num_hidden_layers),
        "patch_size": int(vision.patch_size),
        "native_image_size": int(vision.image_size),
        "weights_signature": signature,
    }


def _signature_problem(stored: list[float], actual: list[float]) -> str | None:
    if len(stored) != len(actual):
        return "weights signature: different length"
    for position, (a, b) in enumerate(zip(stored, actual)):
        if abs(a - b) > SIGNATURE_TOLERANCE * (max(abs(a), abs(b)) if position % 5 == 0 else 1.0):
            return f"weights signature entry {position}: bank {a} vs model {b} (different CLIP weights)"
    return None


def _legacy_weights_sha256(clip_model: torch.nn.Module) -> str | None:
    """The format-1 `weights_sha256` (exact float32 bytes); None for weights that are not float32 (not checkable)."""
    tensors = _signature_tensors(clip_model)
    if any(tensor.dtype != torch.float32 for tensor in tensors):
        return None
    return hashlib.sha256(b"".join(t.detach().to("cpu").contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def feature_settings(config) -> dict[str, Any]:
    """The `MRADConfig` fields that change what a bank key means; a bank must be used with the same ones."""
    names = ("image_size", "vv_start_layer", "feature_layer", "position_interpolation", "class_key_post_layernorm")
    settings = {name: getattr(config, name) for name in names}
    settings["neighbor_kernel_sizes"] = [int(k) for k in config.neighbor_kernel_sizes]
    settings.update(region_rule=str(config.region_rule), mask_threshold=float(config.mask_threshold))
    return settings


@dataclass
class MemoryBank:
    """Keys and values (float32, shapes in the module docstring) of MRAD's two memories, `patch_sources` (N_p,) int64
    (the image entry of each prototype, -1 if unknown) and the JSON-able `metadata`: `backbone`, `features`, `source`,
    `PER_IMAGE_FIELDS`, ...; construction validates the bank and recomputes counts and checksums (`seal`)."""

    image_keys: torch.Tensor
    image_values: torch.Tensor
    patch_keys: torch.Tensor
    patch_values: torch.Tensor
    patch_sources: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.patch_sources is None:
            self.patch_sources = torch.full((self.patch_keys.shape[0],), -1, dtype=torch.long)
        self.validate()
        self.metadata = {"label_convention": LABEL_CONVENTION, **self.metadata}
        self.seal()

    def seal(self) -> None:
        """Recompute the counts and the checksums (tensors, sealed fields); called on construction and on save."""
        self.metadata.update(format_version=BANK_FORMAT_VERSION, counts=self.counts())
        self.metadata["tensors_sha256"] = tensors_checksum(self.tensors())
        validate_calibration(self.metadata.get("calibration"), "metadata['calibration']")
        self.metadata["metadata_sha256"] = _sealed_checksums(self.metadata)

    def validate(self) -> None:
        """Shapes, finiteness and aligned provenance; raises MemoryBankError naming the offending tensor or field."""
        entries = int(self.image_keys.shape[0])
        for level in ("image", "patch"):
            keys, values = getattr(self, f"{level}_keys"), getattr(self, f"{level}_values")
            if keys.ndim != 2:
                raise MemoryBankError(f"{level}_keys must be a 2-D (N, D) tensor, got shape {tuple(keys.shape)}.")
            if not torch.isfinite(keys).all():
                raise MemoryBankError(f"{level}_keys contains NaN or infinite values; rebuild the bank.")
            norms = keys.double().norm(dim=1) if keys.shape[1] else torch.ones(0)  # zero-width views hold no keys
            if len(bad := torch.nonzero((norms - 1).abs() > 1e-3)[:, 0]):  # float32/fp16 rounding stays far below
                raise MemoryBankError(
                    f"{level}_keys are not unit length ({len(bad)} rows, row {int(bad[0])}: L2 norm "
                    f"{float(norms[bad[0]]):.6g}); MRAD's keys are L2-normalised (Sec. 3.2): rebuild the bank."
                )
            if values.ndim != 2 or values.shape[1] != 2:
                raise MemoryBankError(f"{level}_values must be (N, 2) one-hot labels ({LABEL_CONVENTION}).")
            if values.shape[0] != keys.shape[0]:
                raise MemoryBankError(f"{level}_values has {values.shape[0]} rows but its keys have {keys.shape[0]}.")
        if self.patch_sources.shape != (self.patch_keys.shape[0],):
            raise MemoryBankError(f"patch_sources must have one entry per patch key ({self.patch_keys.shape[0]}).")
        for name in PER_IMAGE_FIELDS:
            if self.metadata.get(name) is not None and len(self.metadata[name]) != entries:
                raise MemoryBankError(
                    f"metadata['{name}'] lists {len(self.metadata[name])} entries but the bank has {entries} image "
                    f"entries; the provenance is out of step with the keys. {_EDIT_HINT}"
                )
        if len(self.patch_sources) and int(self.patch_sources.max()) >= entries:
            last = int(self.patch_sources.max())
            raise MemoryBankError(
                f"patch_sources points at image entry {last} of {entries} image entries. {_EDIT_HINT}"
            )

    def counts(self) -> dict[str, int]:
        counts = {}
        for level in ("image", "patch"):
            values = getattr(self, f"{level}_values")
            labels = values.argmax(dim=1) if len(values) else values[:, 0].long()
            counts[f"{level}_entries"] = int(values.shape[0])
            counts[f"{level}_normal"] = int((labels == 0).sum())
            counts[f"{level}_anomalous"] = int((labels == 1).sum())
        return counts

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_NAMES}

    def __repr__(self) -> str:
        counts, widths = self.counts(), {"image": self.image_keys.shape[1], "patch": self.patch_keys.shape[1]}
        image, patch = (
            f"{counts[f'{lv}_entries']} x {widths[lv]} ({counts[f'{lv}_anomalous']} anomalous)" for lv in widths
        )
        return f"MemoryBank(image={image}, patch={patch}, source={self.metadata.get('source')!r})"

    def check_compatible(
        self, backbone: dict[str, Any], features: dict[str, Any], *, strict: bool = True, trust_bank: bool = False
    ) -> None:
        """Refuse (strict=False: warn about) a bank built for another backbone or other feature settings. Key widths
        must always match; a bank without a fingerprint or feature settings is refused unless `trust_bank=True`."""
        for level, dim, what in (("image", "projection_dim", "class keys"), ("patch", "hidden_size", "patch tokens")):
            size = getattr(self, f"{level}_keys").shape[1]
            if size != backbone[dim]:
                raise MemoryBankError(
                    f"This bank's {level} keys are {size}-d but the backbone's {what} are {backbone[dim]}-d: the bank "
                    "was built with another CLIP. Rebuild it with this model (mrad_hf.memory.build_memory_bank, "
                    "`mrad build-bank`) or load the matching backbone."
                )
        stored_backbone, stored_features = (dict(self.metadata.get(name) or {}) for name in ("backbone", "features"))
        unchecked = [] if stored_backbone else ["backbone fingerprint"]
        unchecked += [] if stored_features else ["feature settings"]
        legacy = stored_backbone.get("weights_sha256") and not stored_backbone.get("weights_signature")
        if legacy and backbone.get("weights_sha256") is None:
            unchecked.append("backbone weights (a format-1 hash, checkable only with float32 weights)")
        if stored_backbone and not (stored_backbone.get("weights_signature") or stored_backbone.get("weights_sha256")):
            unchecked.append("backbone weights identity (weights_signature / weights_sha256)")
        if stored_features and (missing := [key for key in features if key not in stored_features]):
            unchecked.append(f"feature settings {missing}")
        if unchecked and not trust_bank:
            raise MemoryBankError(
                f"This bank has no {' and no '.join(unchecked)}, so nothing shows it was built for this backbone and "
                "these settings. Rebuild it with this model, or pass trust_bank=True (to set_memory_bank / "
                "from_pretrained) if you know it is."
            )
        if unchecked:
            warnings.warn(f"trust_bank=True: not checked: {', '.join(unchecked)}.", stacklevel=3)
        signatures = stored_backbone.get("weights_signature"), backbone.get("weights_signature")
        problems = [_signature_problem(*signatures)] if None not in signatures else []
        model_backbone = {k: v for k, v in backbone.items() if k != "weights_signature" and v is not None}
        compared = (("backbone", stored_backbone, model_backbone), ("feature setting", stored_features, features))
        problems += [
            f"{what} {key}: bank {saved[key]!r} vs model {value!r}"
            for what, saved, actual in compared
            for key, value in actual.items()
            if key in saved and saved[key] != value
        ]
        if any(problems):
            message = (
                f"The memory bank does not match this model ({'; '.join(p for p in problems if p)}): its scores would "
                "be meaningless. Rebuild the bank with this model, or pass strict=False if the difference is harmless."
            )
            if strict:
                raise MemoryBankError(message)
            warnings.warn(message, stacklevel=3)
