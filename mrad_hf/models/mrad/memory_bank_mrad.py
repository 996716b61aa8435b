# SPDX-License-Identifier: Apache-2.0
"""MRAD's two-level memory bank as a standalone, versioned safetensors artefact (paper Sec. 3.2).

* Image level: keys = L2-normalised projected class tokens of the auxiliary images (N_c x 768 for
  ViT-L/14), values = one-hot labels (column 0 normal, column 1 anomaly).
* Pixel level: keys = L2-normalised region prototypes (N_p x 1024): per auxiliary image, the mean
  neighbour-averaged V-V token over its anomalous patches and over its normal patches; values one-hot.

A bank is only meaningful for the backbone and feature settings that built it, so it carries metadata:
format version, the backbone's architecture and a hash of its embedding weights, the feature settings
(input size, V-V start, feature layer, neighbour kernels, ...), the source dataset and counts.
`MemoryBank.check_compatible` refuses a bank built for another backbone with a message that says which
field differs. Files are written atomically (temporary file, then rename), so an interrupted save never
leaves a half-written bank under the final name; `atomic_directory` does the same for a whole folder (a
saved model). Integrity: `metadata["tensors_sha256"]` is a SHA-256 of the five tensors and
`metadata["metadata_sha256"]` one per answer-changing metadata field (`SEALED_FIELDS`: backbone, feature settings,
label convention, counts, calibration), recomputed whenever a bank is made or saved; `load` and
`verify_model_memory` refuse a file or a saved model whose tensors or sealed fields no longer match (naming the
field), and a bank that lacks a backbone fingerprint or feature settings unless `trust_bank=True`. A model folder
keeps this metadata in one sidecar, `memory_bank.json` (`MODEL_BANK_FILENAME`), the format bank repos use.

Provenance of every entry (`MemoryBank.provenance`): the source (dataset or folder name), the image id
(relative to the dataset root, or a file name; never an absolute path) and the entry kind ("image", "normal region", "anomalous region"). Image entry
i has `metadata["image_sources"][i]` and `metadata["image_ids"][i]`; a region prototype inherits both from
the image entry `patch_sources` points to. `image_sources` is optional metadata, so the tensor layout and
the format version are unchanged: a bank without it (every bank written before it existed) reads as if
all its entries came from `metadata["source"]`, and older readers ignore it. `mrad_hf.bank_tools` adds,
merges, de-duplicates and removes entries while keeping these lists aligned.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "BANK_FORMAT_VERSION",
    "ENTRY_KINDS",
    "MemoryBank",
    "MemoryBankError",
    "backbone_fingerprint",
    "feature_settings",
    "atomic_write",
    "atomic_directory",
    "tensors_checksum",
    "validate_calibration",
    "verify_model_memory",
]

BANK_FORMAT_VERSION = 2  # 2: dtype-independent backbone signature, sealed metadata fields
MODEL_BANK_FILENAME = "memory_bank.json"
#: Metadata fields that change an answer: each has its own SHA-256 in `metadata["metadata_sha256"]`.
SEALED_FIELDS = ("backbone", "features", "label_convention", "counts", "calibration")
#: Per-image-entry provenance lists, aligned with the image keys.
PER_IMAGE_FIELDS = ("image_ids", "image_sources", "image_sha256")
#: Kinds of memory entries, as `MemoryBank.provenance` reports them.
ENTRY_KINDS = ("image", "normal region", "anomalous region")
_METADATA_KEY = "mrad_memory_bank"
_TENSOR_NAMES = ("image_keys", "image_values", "patch_keys", "patch_values", "patch_sources")
LABEL_CONVENTION = "values[:, 0] = normal, values[:, 1] = anomaly"


class MemoryBankError(ValueError):
    """A memory bank that is missing, malformed, or built for another backbone; the message says what to do."""


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _clean_stale_staging(path: Path) -> None:
    """Remove what a crashed save of `path` left beside it: staging folders of dead processes; a previous folder
    set aside by a swap that died (`.<name>.old-*`) is put back if `path` is missing, otherwise removed."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        parts = leftover.name[len(path.name) + 2 :].split(".")
        if (
            len(parts) == 3
            and parts[2] == "tmp"
            and parts[0].isdigit()
            and leftover.is_dir()
            and not _pid_alive(int(parts[0]))
        ):
            shutil.rmtree(leftover, ignore_errors=True)
        elif parts[0].startswith("old-") and leftover.is_dir():
            if not path.exists():
                os.replace(leftover, path)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded (mode as the umask says)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp (and safetensors) create 0600
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on any exception it is removed.

    An interrupted write (exception, Ctrl-C) leaves `path` exactly as it was: never a folder that mixes files of
    two saves. The swap is two renames (old folder aside, new folder in, old folder deleted); should the process
    die between them, the previous folder survives as `.<name>.old-*` beside it. What a killed save left behind
    (its `.<name>.<pid>.*.tmp` staging folder, an `.old-*` folder) is cleaned up by the next save of `path`.
    The folder's mode follows the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"'{path}' exists and is not a folder; choose another output folder.")
    _clean_stale_staging(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        mask = _umask()
        for root, folders, files in os.walk(tmp):  # safetensors writes 0600 whatever the umask
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a bank's tensors (floats as float32, indices as int64, on CPU)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu")
        tensor = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.to(torch.int64)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _field_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _sealed_checksums(metadata: dict[str, Any]) -> dict[str, str]:
    return {name: _field_sha256(metadata[name]) for name in SEALED_FIELDS if metadata.get(name) is not None}


def verify_seal(stored: dict[str, Any], bank: MemoryBank, origin: str) -> None:
    """Refuse a bank whose tensors or sealed metadata fields differ from what was recorded when it was saved.

    `stored` is the metadata as read from the file, `bank` the bank rebuilt from it (which recomputes the checksums).
    Banks of format 1 recorded only the tensor checksum; their metadata fields are not covered.
    """
    expected = stored.get("tensors_sha256")
    if expected is not None and expected != bank.metadata["tensors_sha256"]:
        raise MemoryBankError(
            f"{origin} is corrupt: its tensors do not match the SHA-256 recorded when it was saved (tensors and metadata "
            "from different saves, or edited/damaged on disk). Rebuild or re-download it."
        )
    if stored.get("counts") is not None and stored["counts"] != bank.counts():
        raise MemoryBankError(
            f"{origin}: metadata field 'counts' was edited ({stored['counts']} vs the tensors' {bank.counts()})."
        )
    recorded = stored.get("metadata_sha256")
    if recorded is None:
        if int(stored.get("format_version", 1)) >= 2:
            raise MemoryBankError(
                f"{origin}: the metadata checksums ('metadata_sha256') were removed; rebuild or re-download the bank."
            )
        return
    actual = _sealed_checksums(stored)
    for name in SEALED_FIELDS:
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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0.0 <= value <= upper
        ):
            raise MemoryBankError(
                f"{origin}: '{key}' is {value!r}; it must be a finite number in [0, {upper:g}] (scores are probabilities). "
                "Recalibrate with `mrad calibrate` or mrad_hf.tools.calibration.calibrate."
            )
    return dict(calibration)


def verify_model_memory(model, *, trust_bank: bool = False) -> None:
    """Check that a loaded MRAD model's memory buffers are the bank its `memory_bank.json` describes, for its backbone.

    Catches a model folder whose `model.safetensors` and `memory_bank.json` come from different saves, bank buffers
    or sealed metadata edited after saving, or CLIP weights swapped under a bank. Raises MemoryBankError.
    """
    config = model.config
    if not config.image_bank_size and not config.patch_bank_size:
        return
    stored = dict(model.memory.metadata or {})
    bank = model.get_memory_bank()
    verify_seal(
        stored,
        bank,
        f"The model's memory bank ({config.image_bank_size} image / {config.patch_bank_size} patch entries)",
    )
    fingerprint = model.backbone_fingerprint()
    if "weights_signature" not in (bank.metadata.get("backbone") or {}):
        fingerprint["weights_sha256"] = _legacy_weights_sha256(model.clip)  # a format-1 bank
    bank.check_compatible(fingerprint, feature_settings(config), trust_bank=trust_bank)


def _signature_pattern(length: int, row: int) -> torch.Tensor:
    """A fixed +-1 pattern (integer hash of the position), identical on every platform and torch version."""
    index = torch.arange(length, dtype=torch.int64)
    return (((index * 2654435761 + (row + 1) * 40503) >> 13) & 1).to(torch.float64) * 2 - 1


def _signature_tensors(clip_model: torch.nn.Module) -> list[torch.Tensor]:
    vision = clip_model.vision_model
    return [
        vision.embeddings.patch_embedding.weight,
        vision.embeddings.class_embedding,
        vision.embeddings.position_embedding.weight,
        vision.post_layernorm.weight,
        vision.post_layernorm.bias,
        clip_model.visual_projection.weight,
    ]


def backbone_fingerprint(clip_model: torch.nn.Module) -> dict[str, Any]:
    """Identity of a CLIP backbone: its vision architecture and a dtype-independent signature of its weights.

    The signature covers the patch embedding, class and position embeddings, the final layer norm and the visual
    projection: per tensor its RMS and 4 normalised projections sqrt(n) <w / |w|, r_j> on fixed +-1 patterns (about
    N(0, 1) for unrelated weights). Casting the weights to bfloat16 or float16 moves a projection by ~1e-3, a
    different backbone by ~1, so `check_compatible` compares signatures with a tolerance (`SIGNATURE_TOLERANCE`):
    one bank serves the float32, bfloat16 and float16 copies of a backbone, and a model saved after a cast.
    """
    vision = clip_model.config.vision_config
    signature = []
    for tensor in _signature_tensors(clip_model):
        flat = tensor.detach().to("cpu", torch.float64).flatten()
        norm = float(flat.norm()) or 1.0
        signature.append(round(norm / math.sqrt(flat.numel()), 6))
        for row in range(4):
            signature.append(round(float(flat @ _signature_pattern(flat.numel(), row)) / norm, 4))
    return {
        "hidden_size": int(vision.hidden_size),
        "projection_dim": int(clip_model.config.projection_dim),
        "num_hidden_layers": int(vision.num_hidden_layers),
        "patch_size": int(vision.patch_size),
        "native_image_size": int(vision.image_size),
        "weights_signature": signature,
    }


#: Largest difference of two signature entries (RMS relative, projections absolute) of one backbone's casts.
SIGNATURE_TOLERANCE = 0.05


def _signature_problem(stored: list[float], actual: list[float]) -> str | None:
    if len(stored) != len(actual):
        return "weights signature: different length"
    for position, (a, b) in enumerate(zip(stored, actual)):
        scale = max(abs(a), abs(b)) if position % 5 == 0 else 1.0
        if abs(a - b) > SIGNATURE_TOLERANCE * scale:
            return f"weights signature entry {position}: bank {a} vs model {b} (different CLIP weights)"
    return None


def _legacy_weights_sha256(clip_model: torch.nn.Module) -> str | None:
    """The format-1 `weights_sha256` (exact float32 bytes); None when the weights are not float32 (cannot be checked)."""
    tensors = _signature_tensors(clip_model)
    if any(tensor.dtype != torch.float32 for tensor in tensors):
        return None
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def feature_settings(config) -> dict[str, Any]:
    """The `MRADConfig` fields that change what a bank key means; a bank must be used with the same ones."""
    return {
        "image_size": int(config.image_size),
        "vv_start_layer": int(config.vv_start_layer),
        "feature_layer": int(config.feature_layer),
        "neighbor_kernel_sizes": [int(k) for k in config.neighbor_kernel_sizes],
        "position_interpolation": str(config.position_interpolation),
        "class_key_post_layernorm": bool(config.class_key_post_layernorm),
        "region_rule": str(config.region_rule),
        "mask_threshold": float(config.mask_threshold),
    }


def _check_label_values(tensors: dict[str, torch.Tensor]) -> None:
    """Stored values must be one-hot rows of 0/1 (LABEL_CONVENTION), keys floating point, patch_sources integers."""
    for name in ("image_values", "patch_values"):
        values = tensors[name]
        if (
            values.ndim == 2
            and values.numel()
            and not (((values == 0) | (values == 1)).all() and (values.sum(dim=1) == 1).all())
        ):
            raise MemoryBankError(f"{name} must hold one-hot 0/1 rows ({LABEL_CONVENTION}); this file's do not.")
    for name in ("image_keys", "patch_keys"):
        if not tensors[name].is_floating_point():
            raise MemoryBankError(f"{name} must be floating point, got {tensors[name].dtype}.")
    sources = tensors.get("patch_sources")
    if sources is not None and sources.is_floating_point():
        raise MemoryBankError(f"patch_sources must be integer indices, got {sources.dtype}.")


def _check_values(name: str, values: torch.Tensor, keys: torch.Tensor) -> None:
    if values.ndim != 2 or values.shape[1] != 2:
        raise MemoryBankError(
            f"{name} must be (N, 2) one-hot labels ({LABEL_CONVENTION}), got shape {tuple(values.shape)}."
        )
    if values.shape[0] != keys.shape[0]:
        raise MemoryBankError(f"{name} has {values.shape[0]} rows but its keys have {keys.shape[0]}.")


@dataclass
class MemoryBank:
    """Keys, values and provenance of MRAD's two memories.

    Attributes:
        image_keys: (N_c, D_c) float32, L2-normalised class-token keys.
        image_values: (N_c, 2) float32 one-hot labels (column 1 = anomaly).
        patch_keys: (N_p, D_p) float32, L2-normalised region prototypes.
        patch_values: (N_p, 2) float32 one-hot labels.
        patch_sources: (N_p,) int64 index of the image entry each prototype came from (-1 if unknown).
        metadata: JSON-able provenance: `format_version`, `backbone` (see `backbone_fingerprint`),
            `features` (see `feature_settings`), `source`, `counts`, `label_convention`, `image_ids`.
    """

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
        self.metadata = dict(self.metadata)
        self._check_provenance()
        self.metadata.setdefault("label_convention", LABEL_CONVENTION)
        self.seal()

    def seal(self) -> None:
        """Recompute the counts and the checksums (tensors, sealed fields); called on construction and on save."""
        self.metadata["format_version"] = BANK_FORMAT_VERSION
        self.metadata["counts"] = self.counts()
        self.metadata["tensors_sha256"] = tensors_checksum(self.tensors())
        validate_calibration(self.metadata.get("calibration"), "metadata['calibration']")
        self.metadata["metadata_sha256"] = _sealed_checksums(self.metadata)

    # ---- structure ----
    def validate(self) -> None:
        """Shapes, dtypes and finiteness; raises MemoryBankError naming the offending tensor."""
        for name in ("image_keys", "patch_keys"):
            keys = getattr(self, name)
            if keys.ndim != 2:
                raise MemoryBankError(f"{name} must be a 2-D (N, D) tensor, got shape {tuple(keys.shape)}.")
            if not torch.isfinite(keys).all():
                raise MemoryBankError(f"{name} contains NaN or infinite values; rebuild the bank.")
        _check_values("image_values", self.image_values, self.image_keys)
        _check_values("patch_values", self.patch_values, self.patch_keys)
        if self.patch_sources.shape != (self.patch_keys.shape[0],):
            raise MemoryBankError(f"patch_sources must have one entry per patch key ({self.patch_keys.shape[0]}).")

    def _check_provenance(self) -> None:
        entries = int(self.image_keys.shape[0])
        for name in PER_IMAGE_FIELDS:
            listed = self.metadata.get(name)
            if listed is not None and len(listed) != entries:
                raise MemoryBankError(
                    f"metadata['{name}'] lists {len(listed)} entries but the bank has {entries} image entries; the "
                    "provenance is out of step with the keys. Rebuild the bank, or edit it only with mrad_hf.bank_tools."
                )
        if len(self.patch_sources) and int(self.patch_sources.max()) >= entries:
            raise MemoryBankError(
                f"patch_sources points at image entry {int(self.patch_sources.max())} but the bank has only {entries} "
                "image entries. Rebuild the bank, or edit it only with mrad_hf.bank_tools."
            )

    # ---- provenance ----
    def image_ids(self) -> list[str]:
        """The id of each image entry (relative to its dataset root, or a file name); `entry-<i>` where none is recorded."""
        ids = self.metadata.get("image_ids")
        return [str(i) for i in ids] if ids is not None else [f"entry-{i}" for i in range(self.image_keys.shape[0])]

    def image_sources(self) -> list[str]:
        """The source (dataset or folder) of each image entry; the bank's `source` where none is recorded per entry."""
        sources = self.metadata.get("image_sources")
        if sources is not None:
            return [str(s) for s in sources]
        return [str(self.metadata.get("source") or "unknown")] * int(self.image_keys.shape[0])

    def image_sha256(self) -> list[str | None]:
        """SHA-256 of each image entry's file bytes (None where unknown), to find test images that are in the bank."""
        hashes = self.metadata.get("image_sha256")
        return list(hashes) if hashes is not None else [None] * int(self.image_keys.shape[0])

    def provenance(self, level: str, index: int) -> dict[str, Any]:
        """Where entry `index` of the "image" or "patch" memory came from.

        Returns `{"level", "index", "kind", "label", "source", "image_id", "image_index"}`: kind is one of
        ENTRY_KINDS, label 0 (normal) / 1 (anomaly), image_index the image entry it belongs to (-1 if unknown).
        """
        if level == "image":
            image_index, label = int(index), int(self.image_values[index].argmax())
            kind = "image"
        elif level == "patch":
            image_index, label = int(self.patch_sources[index]), int(self.patch_values[index].argmax())
            kind = ENTRY_KINDS[2] if label == 1 else ENTRY_KINDS[1]
        else:
            raise ValueError(f"level must be 'image' or 'patch', got {level!r}.")
        known = 0 <= image_index < self.image_keys.shape[0]
        return {
            "level": level,
            "index": int(index),
            "kind": kind,
            "label": label,
            "source": self.image_sources()[image_index] if known else str(self.metadata.get("source") or "unknown"),
            "image_id": self.image_ids()[image_index] if known else None,
            "image_index": image_index if known else -1,
        }

    def counts(self) -> dict[str, int]:
        image_labels = self.image_values.argmax(dim=1) if len(self.image_values) else self.image_values[:, 0].long()
        patch_labels = self.patch_values.argmax(dim=1) if len(self.patch_values) else self.patch_values[:, 0].long()
        return {
            "image_entries": int(self.image_keys.shape[0]),
            "image_normal": int((image_labels == 0).sum()),
            "image_anomalous": int((image_labels == 1).sum()),
            "patch_entries": int(self.patch_keys.shape[0]),
            "patch_normal": int((patch_labels == 0).sum()),
            "patch_anomalous": int((patch_labels == 1).sum()),
        }

    @property
    def is_empty(self) -> bool:
        return self.image_keys.shape[0] == 0 or self.patch_keys.shape[0] == 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_NAMES}

    def to(self, device=None, dtype=None) -> MemoryBank:
        moved = {
            name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() and dtype is not None else None)
            for name, tensor in self.tensors().items()
        }
        return MemoryBank(**moved, metadata=self.metadata)

    def __repr__(self) -> str:
        counts = self.counts()
        return (
            f"MemoryBank(image={counts['image_entries']} x {self.image_keys.shape[1]} "
            f"({counts['image_anomalous']} anomalous), patch={counts['patch_entries']} x {self.patch_keys.shape[1]} "
            f"({counts['patch_anomalous']} anomalous), source={self.metadata.get('source')!r})"
        )

    # ---- compatibility ----
    def check_compatible(
        self, backbone: dict[str, Any], features: dict[str, Any], *, strict: bool = True, trust_bank: bool = False
    ) -> None:
        """Refuse (or, with strict=False, warn about) a bank built for another backbone or other feature settings.

        Key widths must always match; a different weights signature or feature setting is an error when strict. A bank
        without a backbone fingerprint or feature settings cannot be checked: refused unless `trust_bank=True`, which
        warns what was not checked.
        """
        if self.image_keys.shape[1] != backbone["projection_dim"]:
            raise MemoryBankError(
                f"This bank's image keys are {self.image_keys.shape[1]}-d but the backbone projects class tokens to "
                f"{backbone['projection_dim']}-d: the bank was built with another CLIP. Rebuild it with this model "
                "(`model.build_memory_bank(...)`) or load the matching backbone."
            )
        if self.patch_keys.shape[1] != backbone["hidden_size"]:
            raise MemoryBankError(
                f"This bank's patch keys are {self.patch_keys.shape[1]}-d but the backbone's patch tokens are "
                f"{backbone['hidden_size']}-d: the bank was built with another CLIP. Rebuild it with this model."
            )
        stored_backbone = dict(self.metadata.get("backbone") or {})
        stored_features = dict(self.metadata.get("features") or {})
        unchecked = [
            name
            for name, value in (("backbone fingerprint", stored_backbone), ("feature settings", stored_features))
            if not value
        ]
        if (
            not stored_backbone.get("weights_signature")
            and stored_backbone.get("weights_sha256")
            and backbone.get("weights_sha256") is None
        ):
            unchecked.append("backbone weights (a format-1 hash, checkable only with float32 weights)")
        if unchecked and not trust_bank:
            raise MemoryBankError(
                f"This bank has no {' and no '.join(unchecked)}, so nothing shows it was built for this backbone and "
                "these settings. Rebuild it with this model, or pass trust_bank=True (to set_memory_bank / from_pretrained) if "
                "you know it is."
            )
        if unchecked:
            warnings.warn(f"trust_bank=True: not checked: {', '.join(unchecked)}.", stacklevel=3)
        problems = []
        for key, value in backbone.items():
            if key == "weights_signature" and stored_backbone.get(key) is not None:
                problem = _signature_problem(stored_backbone[key], value)
                problems += [problem] if problem else []
            elif key in stored_backbone and value is not None and stored_backbone[key] != value:
                problems.append(f"backbone {key}: bank {stored_backbone[key]!r} vs model {value!r}")
        for key, value in features.items():
            if key in stored_features and stored_features[key] != value:
                problems.append(f"feature setting {key}: bank {stored_features[key]!r} vs model {value!r}")
        if not problems:
            return
        message = (
            "The memory bank does not match this model (" + "; ".join(problems) + "). Its keys would be compared "
            "with features of a different space and the scores would be meaningless. Rebuild the bank with this "
            "model, or pass strict=False if you know the difference is harmless."
        )
        if strict:
            raise MemoryBankError(message)
        warnings.warn(message, stacklevel=3)

    # ---- I/O ----
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank as one safetensors file (metadata as JSON in the header), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "memory_bank.safetensors" if path.is_dir() or not path.suffix else path
        self.seal()
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.tensors().items()}
        header = {_METADATA_KEY: json.dumps(self.metadata, sort_keys=True), "format": "pt"}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MemoryBank:
        """Read a bank written by `save`; a malformed or foreign file raises MemoryBankError naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "memory_bank.safetensors"
        if not path.is_file():
            raise MemoryBankError(
                f"Memory bank file '{path}' does not exist. Build one with `mrad build-bank` or check the path."
            )
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise MemoryBankError(
                f"'{path}' is not a readable safetensors file ({error}); it may be truncated. Rebuild or re-download it."
            ) from error
        if _METADATA_KEY not in header:
            raise MemoryBankError(
                f"'{path}' is a safetensors file but not an MRAD memory bank (no '{_METADATA_KEY}' metadata)."
            )
        missing = [name for name in _TENSOR_NAMES[:4] if name not in tensors]
        if missing:
            raise MemoryBankError(f"'{path}' lacks the tensors {missing}; it is not a complete MRAD memory bank.")
        try:
            metadata = json.loads(header[_METADATA_KEY])
            if not isinstance(metadata, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            raise MemoryBankError(
                f"'{path}' has corrupt bank metadata ({error}); rebuild or re-download it."
            ) from error
        version = metadata.get("format_version", 0)
        if not isinstance(version, int):
            raise MemoryBankError(f"'{path}' has an invalid format_version {version!r}; rebuild or re-download it.")
        if version > BANK_FORMAT_VERSION:
            raise MemoryBankError(
                f"'{path}' uses bank format {version}; this mrad_hf reads up to {BANK_FORMAT_VERSION}. Upgrade mrad_hf."
            )
        try:
            _check_label_values(tensors)
            bank = cls(**{name: tensors[name] for name in _TENSOR_NAMES if name in tensors}, metadata=metadata)
        except MemoryBankError as error:
            raise MemoryBankError(f"'{path}': {error}") from error
        verify_seal(metadata, bank, f"'{path}'")
        return bank


# ---------------------------------------------------------------------- labelled samples, batches, progress
_LABEL_NAMES = {"normal": 0, "good": 0, "ok": 0, "anomaly": 1, "anomalous": 1, "defect": 1, "bad": 1, "ng": 1}


def label_value(label: Any, position: int) -> int:
    if isinstance(label, str):
        if label.lower() not in _LABEL_NAMES:
            raise ValueError(f"Sample {position}: unknown label {label!r}; use 0/1 or 'normal'/'anomaly'.")
        return _LABEL_NAMES[label.lower()]
    value = int(label)
    if value not in (0, 1):
        raise ValueError(f"Sample {position}: label must be 0 (normal) or 1 (anomaly), got {label!r}.")
    return value


def _file_sha256(path: str | os.PathLike) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None  # the decoder reports the unreadable file with its name
    return digest.hexdigest()


def _rows_read_one_by_one(samples: Iterable[Any]) -> Iterator[Any]:
    """The samples in order; a row that fails while it is produced (a `datasets` Image column decodes the file itself)
    raises `MRADInputError` naming the row and the fix, not a raw PIL error."""
    from .image_processing_mrad import MRADInputError

    iterator = iter(samples)
    position = 0
    while True:
        try:
            sample = next(iterator)
        except StopIteration:
            return
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError / truncated files are OSErrors
            raise MRADInputError(
                f"Sample {position} could not be read ({type(error).__name__}: {error}). Skip unreadable files with "
                "mrad_hf.data.loaders.iter_readable_rows(dataset, processor.load_pair, on_error='skip'), or cast the image column with "
                "datasets.Image(decode=False) so that MRAD's decoder reads the file and names it."
            ) from error
        yield sample
        position += 1


def iter_samples(samples: Iterable[Any]) -> Iterator[tuple[Any, int, Any, dict[str, Any]]]:
    """Normalise dict / tuple samples to (image, label, mask, provenance).

    provenance = {"id", "source", "sha256"}: the sample's `id` (relative to its dataset root); for a sample given only
    as a path, its file name and, as source, its folder's name (never an absolute path); `sha256` of the image file's
    bytes when the image is a path (or the row's `sha256`), else None.
    """
    for position, sample in enumerate(_rows_read_one_by_one(samples)):
        if isinstance(sample, dict):
            if "image" not in sample or "label" not in sample:
                raise ValueError(f"Sample {position} needs 'image' and 'label' keys, got {sorted(sample)}.")
            image, label, mask = sample["image"], sample["label"], sample.get("mask")
            sample_id, source, sha = sample.get("id"), sample.get("source"), sample.get("sha256")
            path = sample.get("path")
        else:
            if len(sample) not in (2, 3):
                raise ValueError(f"Sample {position} must be (image, label) or (image, label, mask).")
            image, label, mask = sample[0], sample[1], sample[2] if len(sample) == 3 else None
            sample_id = source = sha = path = None
        if isinstance(image, (str, os.PathLike)):
            path = image
            sha = sha or _file_sha256(image)
        if sample_id is not None and os.path.isabs(os.fspath(sample_id)):
            sample_id = Path(sample_id).name
        if sample_id is None and path is not None:
            sample_id, source = Path(path).name, source or Path(path).parent.name or None
        provenance = {
            "id": str(sample_id if sample_id is not None else f"sample-{position}"),
            "source": source,
            "sha256": sha,
        }
        yield image, label_value(label, position), mask, provenance


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, description: str, enabled: bool, unit: str = "img"):
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of transformers, but stay usable without it
        return _NullBar()
    return tqdm(total=total, desc=description, unit=unit)
