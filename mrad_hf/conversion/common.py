# SPDX-License-Identifier: Apache-2.0
"""What every converter shares: the one safe loader for `.pt` / `.pth` files, file digests, the error type.

The loader executes nothing from a file and allocates nothing a file merely claims: storages must be as large as the
bytes stored for them (`torch.load` checks that for zip files; `_legacy_storage_problem` checks it for the pre-1.6
format before `torch.load` allocates), and every tensor must be made of its stored bytes
(`torchscript.tensor_extent_problem`: no `expand`ed, overlapping or endlessly shared views). Refusals never repeat
torch's advice to re-run with `weights_only=False` (that runs the file's code); they say what MRAD accepts instead.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .torchscript import (
    _STORAGE_DTYPES,
    TorchScriptReadError,
    is_torchscript_archive,
    read_torchscript_state_dict,
    tensor_extent_problem,
)

__all__ = ["ConversionError", "load_torch_file", "sha256_of", "check_keys", "print_error", "require_mapping"]


class ConversionError(ValueError):
    """An input file that cannot be converted; the message names the file, what is wrong and what to do."""


def load_torch_file(path: str | os.PathLike, what: str, *, torchscript: bool = False) -> Any:
    """Load a PyTorch file on CPU without executing anything from it.

    Plain files go through `torch.load(weights_only=True)` (tensors, dicts, lists, numbers only). A TorchScript
    archive (OpenAI's released CLIP `.pt` files are ones) is read, when `torchscript=True`, by
    `torchscript.read_torchscript_state_dict` (a restricted unpickler: no archive code runs) and its state dict is
    returned; otherwise (the official MRAD banks and checkpoints are plain pickles) it is refused by name. Tensors
    not made of the file's stored bytes are refused naming the tensor (see the module docstring).
    """
    path = Path(path)
    accepted = "plain torch.save files of tensors in dicts and lists" + (
        " and OpenAI's released TorchScript CLIP archives"
        if torchscript
        else " (the official MRAD files are such files)"
    )
    if not path.is_file():
        raise ConversionError(
            f"{what} '{path}' does not exist. Check the path (the official files are on the MRAD Google Drive)."
        )
    if is_torchscript_archive(path):
        if not torchscript:
            raise ConversionError(
                f"{what} '{path}' is a TorchScript archive (it carries code), not a plain pickled state dict; the official MRAD "
                "banks and checkpoints are plain state dicts, and this converter does not read archives with code. Give the "
                "file from the MRAD release (torch.save of a dict of tensors)."
            )
        try:
            return read_torchscript_state_dict(path)
        except (TorchScriptReadError, zipfile.BadZipFile, OSError) as error:
            raise ConversionError(
                f"{what} '{path}' is a TorchScript archive that cannot be read without running its code: {error}. "
                "Re-download OpenAI's file, or convert a plain state dict (torch.save(model.state_dict(), ...))."
            ) from error
    problem = None if zipfile.is_zipfile(path) else _legacy_storage_problem(path)
    if problem:
        raise ConversionError(f"{what} '{path}' is not a valid PyTorch file: {problem}. Re-download it.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{what} '{path}' holds Python objects or code that MRAD will not execute ({_torch_reason(error)}). "
            f"MRAD reads only {accepted}; get the file in that form."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(
            f"{what} '{path}' is not a readable PyTorch file ({_torch_reason(error)}); it may be truncated. Re-download it."
        ) from error
    problem = tensor_extent_problem(loaded, path.stat().st_size)
    if problem:
        raise ConversionError(
            f"{what} '{path}': {problem}. A weights file stores every element of its tensors; this one would make "
            "the converter allocate far more memory than the file holds, so it is refused. Re-save the real tensors "
            "(torch.save(tensor.contiguous().clone(), ...))."
        )
    return loaded


_ADVICE = re.compile(r"weights_only|trust|safe_globals|documentation|Weights only load failed|two options|^\(\d\)")


def _torch_reason(error: BaseException) -> str:
    """What torch's load error says is wrong, without its advice (re-running with `weights_only=False` "will likely
    succeed" runs the file's code; allowlisting globals does too): the refused global, else the first sentence that
    gives no advice."""
    text = str(error)
    if match := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it refers to '{match.group(1)}', which a weights file never needs"
    sentences = (part.strip() for part in re.split(r"(?<=[.!?])\s+|\n", text))
    return next((part[:200] for part in sentences if part and not _ADVICE.search(part)), type(error).__name__)


class _Inert:
    """What the census below makes of every global: a class that builds, calls and stores nothing."""

    storage_name: str | None = None

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageCensus(pickle.Unpickler):
    """Reads the pickles of a legacy-format file only to sum the storage sizes they claim (key -> bytes)."""

    def __init__(self, handle):
        super().__init__(handle)
        self.claimed: dict[str, int] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return type(name, (_Inert,), {"storage_name": name})
        return _Inert

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            dtype = _STORAGE_DTYPES.get(getattr(pid[1], "storage_name", None))
            if not isinstance(pid[4], int) or pid[4] < 0 or dtype is None:
                raise ValueError(f"an invalid storage record ({str(pid)[:80]})")
            self.claimed[str(pid[2])] = pid[4] * torch.empty((), dtype=dtype).element_size()
        return _Inert()


def _legacy_storage_problem(path: Path) -> str | None:
    """For PyTorch's legacy (pre-1.6, non-zip) format, whose loader allocates every storage at the size the pickle
    claims before reading it: why the claims exceed the file, or None (also for files of another format, which
    `torch.load` then reads or refuses). The pickles are read by `_StorageCensus`: no global is imported."""
    with open(path, "rb") as handle:
        census = _StorageCensus(handle)
        try:
            if census.load() != 0x1950A86A20F9469CFC6C:  # torch's magic number: not a legacy file
                return None
        except Exception:  # not a legacy file; torch.load says what it is
            return None
        try:
            for _ in range(3):  # protocol version, system info, the saved object
                census.load()
        except Exception as error:  # a malformed legacy pickle is refused before torch.load allocates
            return f"its pickle is malformed ({type(error).__name__}: {str(error)[:120]})"
    claimed, size = sum(census.claimed.values()), path.stat().st_size
    if claimed > size:
        return f"its pickle claims storages of {claimed} bytes but the file holds only {size}"
    return None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_keys(found: Iterable[str], expected: Iterable[str], where: str, *, ignored: Iterable[str] = ()) -> None:
    """Stop with the full lists when `found` has keys outside `expected` (+ `ignored`) or lacks some of `expected`."""
    found, expected, ignored = set(found), set(expected), set(ignored)
    unknown = sorted(found - expected - ignored)
    missing = sorted(expected - found)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unknown:
            parts.append(f"unknown keys: {unknown}")
        raise ConversionError(
            f"{where}: {'; '.join(parts)}. This is not the expected official format; check that the file is the right one."
        )


def require_mapping(obj: Any, path: str | os.PathLike, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{what} '{path}' holds a {type(obj).__name__}, not a dict; this is not the official format."
        )
    return obj


def print_error(args, error: BaseException) -> None:
    """A converter's refusal as one line, `<program>: error: <message>` (`mrad convert clip: error: ...`)."""
    print(f"{getattr(args, 'prog', 'mrad convert')}: error: {error}", file=sys.stderr)
