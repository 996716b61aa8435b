# SPDX-License-Identifier: Apache-2.0
"""Files the package writes, each complete or not at all: the one atomic-save helper and the bank file (Sec. 3.2).

`atomic_write` writes one file through a temporary file and a rename; `atomic_directory` does the same for a whole
folder; `save_model` saves an MRAD model folder through them, so that `mrad` commands never leave a half-written
model. An output never destroys what the package did not write: a folder is replaced only when it is empty or a
previous output of the same `FolderKind` (whose stale outputs are dropped and whose other files are kept), and a bank
file only replaces an MRAD bank. `save_bank` / `load_bank` read and write the standalone bank file (`memory_bank.safetensors`: the five
tensors, the metadata as JSON in the safetensors header), the format bank repos use; a model folder keeps the same
metadata in `memory_bank.json` (`models/mrad/memory_bank_mrad.py`, which also holds the integrity checks).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..models.mrad.memory_bank_mrad import (
    _TENSOR_NAMES,
    BANK_FORMAT_VERSION,
    LABEL_CONVENTION,
    MemoryBank,
    MemoryBankError,
    verify_seal,
)

__all__ = [
    "CLIP_FOLDER",
    "MODEL_FOLDER",
    "FolderKind",
    "atomic_directory",
    "atomic_write",
    "check_bank_output",
    "check_output_folder",
    "load_bank",
    "save_bank",
    "save_model",
]

BANK_FILENAME = "memory_bank.safetensors"
_METADATA_KEY = "mrad_memory_bank"


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder the package writes: `what` names it in messages, `is_previous(folder)` recognises one written
    before, `outputs` are the name patterns of the top-level files a save of it may write (a previous save's files
    that the new save does not write again are stale and dropped; every other file in the folder is the user's)."""

    what: str
    is_previous: Callable[[Path], bool]
    outputs: tuple[str, ...]

    def is_output(self, name: str) -> bool:
        return any(fnmatch(name, pattern) for pattern in self.outputs)


def _model_type(folder: Path) -> str | None:
    """`model_type` of the folder's config.json; None when it has none (or it is not a readable JSON object)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "generation_config.json")
MODEL_FOLDER = FolderKind(
    "an MRAD model folder",
    lambda folder: _model_type(folder) == "mrad",
    ("config.json", *_WEIGHTS, "memory_bank.json", "calibration.json", "preprocessor_config.json", "*_mrad.py")
    + ("pipeline_anomaly_detection.py", "training_history.json"),
)
CLIP_FOLDER = FolderKind(
    "a CLIP model folder", lambda folder: _model_type(folder) == "clip", ("config.json", *_WEIGHTS)
)


def check_output_folder(path: str | os.PathLike, kind: FolderKind) -> None:
    """Refuse an output folder where a save of `kind` would overwrite files the package did not write: `path` must be
    missing, a folder without any of `kind.outputs` (its files are kept) or a previous output of `kind`. Call it
    before long work; the savers check it again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"'{path}' exists and is not a folder; choose another output folder.")
    clashes = sorted(entry.name for entry in path.iterdir() if kind.is_output(entry.name)) if path.is_dir() else []
    if clashes and not kind.is_previous(path):
        raise FileExistsError(
            f"'{path}' is not {kind.what} but holds {', '.join(clashes[:4])}{' ...' if len(clashes) > 4 else ''}, "
            "which this save would overwrite. Choose a new or empty output folder."
        )


def _is_bank_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _METADATA_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - anything that is not a readable safetensors file is not a bank
        return False


def check_bank_output(path: str | os.PathLike) -> Path:
    """The file `save_bank` writes for `path`; refused when it exists and is not an MRAD bank (an image, a model's
    weights, ...): a bank output only ever replaces a bank. Call it before long work; `save_bank` checks it again."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / BANK_FILENAME if path.is_dir() or not path.suffix else path
    if path.exists() and not (path.is_file() and _is_bank_file(path)):
        raise FileExistsError(
            f"'{path}' exists and is not an MRAD memory bank; a bank is written only to a new file or over a bank. "
            "Choose another output path (e.g. banks/name.safetensors)."
        )
    return path


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


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a file's bytes (what banks store per image entry as ``image_sha256``); None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None  # the decoder reports the unreadable file with its name
    return digest.hexdigest()


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or, on POSIX, a folder's entries') data to the disk, so that a rename after it survives a power
    loss with the new content rather than an empty file. Best effort: file systems that cannot sync are skipped."""
    try:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
        descriptor = os.open(path, flags)
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded (mode as the umask says; synced to
    the disk before the rename, and the folder after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp (and safetensors) create 0600
        _fsync(tmp_name)
        os.replace(tmp_name, path)
        _fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, kind: FolderKind) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on any exception it is removed.

    `path` must pass `check_output_folder(path, kind)`. The user's files in it (every entry that is not one of
    `kind.outputs`) are carried into the new folder (hard links where possible); a previous save's outputs are
    replaced, or dropped when the new save does not write them again (a stale calibration never outlives its bank).
    An interrupted write (exception, Ctrl-C) leaves `path` exactly as it was: never a folder that mixes files of
    two saves. The swap is two renames (old folder aside, new folder in, old folder deleted); should the process
    die between them, the previous folder survives as `.<name>.old-*` beside it. What a killed save left behind
    (its `.<name>.<pid>.*.tmp` staging folder, an `.old-*` folder) is cleaned up by the next save of `path`.
    The folder's mode follows the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(path)
    check_output_folder(path, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        check_output_folder(path, kind)  # nothing else wrote there meanwhile
        mask = _umask()
        for root, folders, files in os.walk(tmp):  # safetensors writes 0600 whatever the umask
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
                _fsync(os.path.join(root, name))
            _fsync(root)
        old = None
        if path.exists():
            for entry in path.iterdir():  # the user's files move with the folder
                if not kind.is_output(entry.name) and not (tmp / entry.name).exists():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    elif entry.is_symlink():
                        os.symlink(os.readlink(entry), tmp / entry.name)
                    else:
                        _link_or_copy(str(entry), str(tmp / entry.name))
            _fsync(tmp)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, folder: str | os.PathLike, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)` through a staging folder: never a half-written model folder.

    A new (or empty) folder appears complete or not at all; into an existing folder (`check_output_folder` with
    `MODEL_FOLDER`) the finished files are moved one by one, `config.json` last, a previous save's outputs that this
    save does not write are removed (e.g. a `calibration.json` of another bank), and the user's other files are kept.
    """
    target = Path(folder)
    check_output_folder(target, MODEL_FOLDER)
    if not target.exists() or not any(target.iterdir()):
        with atomic_directory(target, MODEL_FOLDER) as staging:
            model.save_pretrained(staging, **kwargs)
        return
    staging_root = target.with_name(f".{target.name}.staging")
    with atomic_directory(staging_root, MODEL_FOLDER) as staging:
        model.save_pretrained(staging, **kwargs)
        check_output_folder(target, MODEL_FOLDER)
        written = sorted(
            (path for path in staging.rglob("*") if path.is_file()), key=lambda p: p.name == "config.json"
        )
        for entry in target.iterdir():  # first, so that a crash half way is refused on load rather than mixed
            if MODEL_FOLDER.is_output(entry.name) and entry.is_file() and not (staging / entry.name).exists():
                entry.unlink()
        for path in written:
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            _fsync(path)  # as atomic_directory does before its swap: the moved file survives a power loss
            os.replace(path, destination)
            _fsync(destination.parent)
    shutil.rmtree(staging_root, ignore_errors=True)


def save_bank(bank: MemoryBank, path: str | os.PathLike) -> Path:
    """Write the bank as one safetensors file (metadata as JSON in the header), atomically, to a new path or over a
    bank (`check_bank_output`); returns the path."""
    path = check_bank_output(path)
    bank.seal()
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in bank.tensors().items()}
    header = {_METADATA_KEY: json.dumps(bank.metadata, sort_keys=True), "format": "pt"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def _check_label_values(tensors: dict[str, torch.Tensor]) -> None:
    """Stored keys and values must be floating point, values one-hot rows of 0/1 (LABEL_CONVENTION), patch_sources
    integers."""
    for name in ("image_keys", "patch_keys", "image_values", "patch_values"):
        if not tensors[name].is_floating_point():  # bool/int values would fail later with a bare torch error
            raise MemoryBankError(f"{name} must be floating point, got {tensors[name].dtype}.")
    for name in ("image_values", "patch_values"):
        values = tensors[name]
        if (
            values.ndim == 2
            and values.numel()
            and not (((values == 0) | (values == 1)).all() and (values.sum(dim=1) == 1).all())
        ):
            raise MemoryBankError(f"{name} must hold one-hot 0/1 rows ({LABEL_CONVENTION}); this file's do not.")
    sources = tensors.get("patch_sources")
    if sources is not None and (sources.is_floating_point() or sources.dtype == torch.bool):
        raise MemoryBankError(f"patch_sources must be integer indices, got {sources.dtype}.")


def load_bank(path: str | os.PathLike) -> MemoryBank:
    """Read a bank written by `save_bank`; a malformed or foreign file raises MemoryBankError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / BANK_FILENAME
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
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested too deeply to parse
        raise MemoryBankError(f"'{path}' has corrupt bank metadata ({error}); rebuild or re-download it.") from error
    version = metadata.get("format_version")  # every bank file records it (an integer from 1)
    if type(version) is not int or version < 1:
        raise MemoryBankError(f"'{path}' has an invalid format_version {version!r}; rebuild or re-download it.")
    if version > BANK_FORMAT_VERSION:
        raise MemoryBankError(
            f"'{path}' uses bank format {version}; this mrad_hf reads up to {BANK_FORMAT_VERSION}. Upgrade mrad_hf."
        )
    try:
        _check_label_values(tensors)
        bank = MemoryBank(**{name: tensors[name] for name in _TENSOR_NAMES if name in tensors}, metadata=metadata)
    except MemoryBankError as error:
        raise MemoryBankError(f"'{path}': {error}") from error
    verify_seal(metadata, bank, f"'{path}'")
    return bank
