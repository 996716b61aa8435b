# SPDX-License-Identifier: Apache-2.0
"""Read the weights of a TorchScript archive (OpenAI's released CLIP `.pt` files) without executing anything.

`torch.jit.load` runs the archive's TorchScript while it loads (every module's `__setstate__`), so a crafted `.pt`
can write or read files, allocate without bound or never return before a single key is checked. This reader
never does that. It opens the zip and unpickles `<archive>/data.pkl` with `RestrictedUnpickler`, which resolves
only

* the tensor rebuild functions (`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`, `_rebuild_parameter`),
  replaced by local functions that check sizes and strides against the storage;
* the typed storage names (`torch.FloatStorage`, ...), as dtype tokens;
* `collections.OrderedDict` (a plain container);
* `__torch__.*` classes, each turned into an inert attribute holder (`ScriptObject`): its pickled attributes are
  stored, no method of the archive is ever called;

and refuses any other global by name. Storages are read from the zip's `data/<key>` records (stored, not
compressed, and exactly as large as the pickle claims), copied into a bytearray (no `torch.from_file`, no shared
memory). The state dict is then collected like `ScriptModule.state_dict()`: the tensors each class declares in
`__parameters__` / `__buffers__` (read as text from the archive's `code/` files, never executed), with dotted
names.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TorchScriptReadError",
    "ScriptObject",
    "RestrictedUnpickler",
    "is_torchscript_archive",
    "read_torchscript_state_dict",
]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class TorchScriptReadError(ValueError):
    """An archive this reader refuses; the message says why."""


class ScriptObject:
    """An inert stand-in for a pickled `__torch__.*` object: it holds the attributes, it has no behaviour."""

    script_class = "?"
    custom_state: Any = None

    @property
    def attributes(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_attributes", {})

    def __setstate__(self, state):  # called by pickle's BUILD: store, never run anything
        if isinstance(state, dict):
            self.attributes.update(state)
        else:
            self.__dict__["custom_state"] = state


def _holder(qualified_name: str) -> type:
    return type("ScriptObject", (ScriptObject,), {"script_class": qualified_name})


def _element_count(size, stride) -> int:
    if not all(isinstance(v, int) and v >= 0 for v in (*size, *stride)) or len(size) != len(stride):
        raise TorchScriptReadError(f"a tensor with invalid size {size} / stride {stride}")
    return 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride))


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, torch.Tensor) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchScriptReadError("a tensor record that does not point at a storage")
    if storage_offset + _element_count(size, stride) > storage.numel():
        raise TorchScriptReadError(
            f"a tensor of size {size} / stride {stride} at offset {storage_offset} reaches past its storage ({storage.numel()} elements)"
        )
    return torch.as_strided(storage, size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    if not isinstance(data, torch.Tensor):
        raise TorchScriptReadError("a parameter record without a tensor")
    return data


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`: tensors, storages, plain containers, inert `__torch__` objects, nothing else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            return self.classes.setdefault(qualified, _holder(qualified))
        raise TorchScriptReadError(
            f"it refers to '{module}.{name}', which a weights archive never needs (only tensors, storages and containers are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchScriptReadError(f"an unknown persistent record {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(key, str) or not re.fullmatch(r"[0-9]+", key) or not isinstance(numel, int) or numel < 0:
            raise TorchScriptReadError(f"an invalid storage record (key {key!r}, {numel!r} elements)")
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise TorchScriptReadError(f"storage record '{name}' is missing") from None
            nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchScriptReadError(f"storage record '{name}' is compressed (PyTorch stores them uncompressed)")
            if info.file_size != nbytes:
                raise TorchScriptReadError(
                    f"storage record '{name}' holds {info.file_size} bytes but the pickle claims {numel} {storage_type.name} elements ({nbytes} bytes)"
                )
            data = bytearray(self.archive.read(name))
            self.storages[key] = (
                torch.frombuffer(data, dtype=storage_type.dtype) if data else torch.empty(0, dtype=storage_type.dtype)
            )
        storage = self.storages[key]
        if storage.dtype != storage_type.dtype or storage.numel() != numel:
            raise TorchScriptReadError(f"storage record '{key}' is used with two different types or sizes")
        return storage


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with `constants.pkl` or a `code/` folder), whatever its extension."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            _parts(name)[-1:] == ["constants.pkl"] or "code" in _parts(name)[:-1] for name in archive.namelist()
        )


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part]


_CLASS = re.compile(r"^class (\w+)\([^)]*\):\s*$")
_LIST = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")


def _declared_tensors(archive: zipfile.ZipFile, prefix: str, qualified: str) -> list[str] | None:
    """The names a `__torch__` class declares in `__parameters__` + `__buffers__` (from its code file, as text)."""
    module, _, class_name = qualified.rpartition(".")
    name = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        text = archive.read(name).decode("utf-8", errors="replace")
    except KeyError:
        return None
    declared, current = None, None
    for line in text.splitlines():
        match = _CLASS.match(line)
        if match:
            current = match.group(1)
            continue
        match = _LIST.match(line)
        if match and current == class_name:
            declared = (declared or []) + re.findall(r'"([^"]+)"', match.group(2))
    return declared


def _collect(
    obj: ScriptObject,
    prefix: str,
    archive,
    code_prefix: str,
    out: dict[str, torch.Tensor],
    seen: set[int],
    source: str,
) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.custom_state is not None:
        raise TorchScriptReadError(
            f"object '{obj.script_class}' at '{prefix.rstrip('.') or '<root>'}' saves a custom state (a __setstate__ method of the archive), "
            "which is code this reader does not run; a weights archive has none"
        )
    declared = _declared_tensors(archive, code_prefix, obj.script_class)
    for name, value in obj.attributes.items():
        if isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", archive, code_prefix, out, seen, source)
        elif isinstance(value, torch.Tensor) and (declared is None or name in declared):
            out[prefix + name] = value


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (what `torch.jit.load(path).state_dict()` returns), read without
    executing anything; raises `TorchScriptReadError` naming what it refused."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if _parts(name)[1:] == ["data.pkl"]]
        if len(pickles) != 1:
            raise TorchScriptReadError(f"expected one '<name>/data.pkl' record, found {len(pickles)}")
        code_prefix = pickles[0][: -len("data.pkl")]
        unpickler = RestrictedUnpickler(archive.read(pickles[0]), archive, code_prefix, str(path))
        try:
            root = unpickler.load()
        except TorchScriptReadError:
            raise
        except (
            pickle.UnpicklingError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            KeyError,
            EOFError,
            RuntimeError,
        ) as error:
            raise TorchScriptReadError(
                f"its data.pkl is not a valid weights pickle ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(root, ScriptObject):
            raise TorchScriptReadError(f"its data.pkl holds a {type(root).__name__}, not a TorchScript module")
        state: dict[str, torch.Tensor] = {}
        try:
            _collect(root, "", archive, code_prefix, state, set(), str(path))
        except RecursionError:
            raise TorchScriptReadError("its modules are nested too deeply for a weights archive") from None
    return state
