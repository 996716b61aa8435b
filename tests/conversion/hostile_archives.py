# SPDX-License-Identifier: Apache-2.0
"""Hostile `.pt` files for the converter tests (issue 13 §1): TorchScript archives whose `__setstate__` writes a file
through `torch.from_file(..., shared=True)`, reads a file into a tensor, never returns, or allocates a terabyte, and
hand-made archives whose `data.pkl` calls `os.system`, claims a huge storage or points past its storage.

The TorchScript ones are made with `torch.jit.script` (tests may CREATE archives; the package never loads one with
torch.jit). Their code is in this file because TorchScript compiles from source files."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import torch
import torch.nn as nn


class WritesFile(nn.Module):
    """`__setstate__` maps `target` with `torch.from_file(shared=True)` and overwrites its first 8 bytes with 'A'."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.target = target

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        mapped = torch.from_file(state[1], shared=True, size=8, dtype=torch.uint8)
        mapped.fill_(65)
        self.weight = state[0] + mapped[0:2].to(torch.float32) * 0.0
        self.target = state[1]
        self.training = state[2]


class ReadsFile(nn.Module):
    """`__setstate__` reads the first 8 bytes of `target` (e.g. /etc/passwd) into `weight`."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8), requires_grad=False)
        self.target = target

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight = torch.from_file(state[1], shared=False, size=8, dtype=torch.uint8).to(torch.float32)
        self.target = state[1]
        self.training = state[2]


class Loops(nn.Module):
    """`__setstate__` never returns (100 % CPU under torch.jit.load)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[1]
        while True:
            pass


class Allocates(nn.Module):
    """`__setstate__` asks for a terabyte."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0] + torch.ones(1 << 38)[0:2]
        self.training = state[1]


def script_archive(module: nn.Module, path: Path):
    """Save `torch.jit.script(module)` to `path` and return the scripted module (its methods can be called directly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))
    return scripted


# ---------------------------------------------------------------- hand-made archives (raw data.pkl)
class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (
            self.storage,
            self.offset,
            self.size,
            self.stride,
            False,
            collections.OrderedDict(),
        )


class _Call:
    """Pickles as a call of any importable function (what an attacker would put in data.pkl)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _Pickler(pickle.Pickler):
    legacy = False  # the legacy format's storage records carry a sixth field (view metadata)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) + ((None,) if self.legacy else ())
        return None


def _script_class(name: str):
    module = sys.modules.setdefault("__torch__", types.ModuleType("__torch__"))
    if not hasattr(module, name):
        setattr(module, name, type(name, (), {"__module__": "__torch__", "__qualname__": name}))
    return getattr(module, name)


def write_raw_archive(
    path: Path,
    attributes: dict,
    records: dict[str, bytes],
    *,
    torchscript: bool = True,
    compress: bool = False,
    parameters: tuple[str, ...] = (),
) -> None:
    """A zip in TorchScript's layout whose root object is a `__torch__.Root` with `attributes` (use `raw_tensor`,
    `_Call`, ...); `records` are the `data/<key>` storages. Without `torchscript` there is no constants.pkl/code/.
    `parameters` are the attributes `Root` declares in `__parameters__` (what a reader collects as its state dict)."""
    root = _script_class("Root")()
    root.__dict__.update(attributes)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in records.items():
            archive.writestr(
                f"archive/data/{key}", data, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            )
        if torchscript:
            archive.writestr("archive/constants.pkl", b"\x80\x02).")
            archive.writestr(
                "archive/code/__torch__.py",
                f"class Root(Module):\n  __parameters__ = {list(parameters)!r}\n  __buffers__ = []\n".replace(
                    "'", '"'
                ),
            )
        archive.writestr("archive/version", "3\n")


def raw_tensor(key: str, numel: int, size, stride=None, offset: int = 0) -> _Tensor:
    stride = stride or tuple(int(torch.tensor(size[i + 1 :]).prod()) for i in range(len(size)))
    return _Tensor(_Storage(key, numel), size, stride, offset)


def system_call(command: str) -> _Call:
    return _Call(os.system, command)


def write_plain_zip(path: Path, obj, records: dict[str, bytes]) -> None:
    """A file in `torch.save`'s zip layout whose object is `obj` (plain dicts / lists of `raw_tensor`s, `_Call`s)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")


def write_legacy_file(path: Path, obj, records: dict[str, bytes]) -> None:
    """A file in PyTorch's legacy (pre-1.6, non-zip) layout: magic number, protocol, system info, `obj` (with
    `raw_tensor`s, whose storage records claim their own sizes), the storage keys, then each of `records` as its
    float32 element count + bytes. torch.load allocates every storage at its claimed size before reading it."""
    with open(path, "wb") as handle:
        pickle.dump(0x1950A86A20F9469CFC6C, handle, protocol=2)
        pickle.dump(1001, handle, protocol=2)
        pickle.dump(
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
            handle,
            protocol=2,
        )
        pickler = _Pickler(handle, protocol=2)
        pickler.legacy = True
        pickler.dump(obj)
        pickle.dump(sorted(records), handle, protocol=2)
        for key in sorted(records):
            handle.write(struct.pack("<q", len(records[key]) // 4) + records[key])
