# SPDX-License-Identifier: Apache-2.0
"""What every converter shares: the one safe loader for `.pt` / `.pth` files, file digests, the error type."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["ConversionError", "load_torch_file", "sha256_of", "check_keys", "require_mapping"]


class ConversionError(ValueError):
    """An input file that cannot be converted; the message names the file, what is wrong and what to do."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """Load a PyTorch file on CPU without executing pickled code.

    Plain files go through `torch.load(weights_only=True)` (tensors, dicts, lists, numbers only). A TorchScript
    archive (OpenAI's released CLIP `.pt` files are ones) is opened with `torch.jit.load` and only its
    `state_dict()` is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} '{path}' does not exist. Check the path (the official files are on the MRAD Google Drive).")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is the only reader of these archives
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as error:
            raise ConversionError(f"{what} '{path}' looks like a TorchScript archive but cannot be read ({error}); re-download it.") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{what} '{path}' holds Python objects other than tensors and containers, so it cannot be loaded safely "
            f"(torch.load(weights_only=True) refused: {str(error).splitlines()[0]}). Re-save it as a plain state dict."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{what} '{path}' is not a readable PyTorch file ({error}); it may be truncated. Re-download it.") from error


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
        raise ConversionError(f"{where}: {'; '.join(parts)}. This is not the expected official format; check that the file is the right one.")


def require_mapping(obj: Any, path: str | os.PathLike, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{what} '{path}' holds a {type(obj).__name__}, not a dict; this is not the official format.")
    return obj
