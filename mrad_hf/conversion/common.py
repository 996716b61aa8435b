# SPDX-License-Identifier: Apache-2.0
"""What every converter shares: the one safe loader for `.pt` / `.pth` files, file digests, the error type."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .torchscript import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict

__all__ = ["ConversionError", "load_torch_file", "sha256_of", "check_keys", "require_mapping"]


class ConversionError(ValueError):
    """An input file that cannot be converted; the message names the file, what is wrong and what to do."""


def load_torch_file(path: str | os.PathLike, what: str, *, torchscript: bool = False) -> Any:
    """Load a PyTorch file on CPU without executing anything from it.

    Plain files go through `torch.load(weights_only=True)` (tensors, dicts, lists, numbers only). A TorchScript
    archive (OpenAI's released CLIP `.pt` files are ones) is read, when `torchscript=True`, by
    `torchscript.read_torchscript_state_dict` (a restricted unpickler: no archive code runs) and its state dict is
    returned; otherwise (the official MRAD banks and checkpoints are plain pickles) it is refused by name.
    """
    path = Path(path)
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{what} '{path}' holds Python objects other than tensors and containers, so it cannot be loaded safely "
            f"(torch.load(weights_only=True) refused: {str(error).splitlines()[0]}). Re-save it as a plain state dict."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(
            f"{what} '{path}' is not a readable PyTorch file ({error}); it may be truncated. Re-download it."
        ) from error


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
