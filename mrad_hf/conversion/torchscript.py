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

`tensor_extent_problem` (also run by `common.load_torch_file` on what `torch.load` returns) refuses, by name, any
tensor that is not made of its stored bytes: a stride-0 dimension (`torch.zeros(1).expand(3_000_000, 768)` pickles
as 4 bytes and becomes 9 GB once a converter copies it), overlapping strides, or all tensors together reading far
more bytes than the file holds. A weights tensor covers each of its stored elements once.
"""

from __future__ import annotations

import collections
import io
import math
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
    "tensor_extent_problem",
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


def _bounds_problem(size, stride, offset, storage_numel: int) -> str | None:
    """Why a view (size, stride, offset) does not lie inside a storage of `storage_numel` elements, or None."""
    values = (*size, *stride, offset)
    if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return f"has an invalid size {size} / stride {stride} / offset {offset!r}"
    if min(values, default=0) < 0:
        return f"has a negative size, stride or offset (size {size} / stride {stride} / offset {offset})"
    if 0 not in size and offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) > storage_numel:
        return (
            f"of size {size} / stride {stride} at offset {offset} reaches past its storage ({storage_numel} elements)"
        )
    return None


def _extent_problem(size, stride, offset, storage_numel: int) -> str | None:
    """Why a view is not made of stored elements, each read once, or None: besides `_bounds_problem`, stride 0 over
    more than one element (`expand`) and overlapping strides (more elements than the storage holds from `offset` on)
    are refused, as each lets a few stored bytes stand for gigabytes once the tensor is copied."""
    problem = _bounds_problem(size, stride, offset, storage_numel)
    if problem or 0 in size:
        return problem
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        return f"of size {size} repeats its elements (stride {stride}: an expanded view, not stored data)"
    if math.prod(size) > storage_numel - offset:
        return (
            f"of size {size} / stride {stride} has {math.prod(size)} elements but its storage holds only "
            f"{storage_numel - offset} from offset {offset} (overlapping strides: elements are read more than once)"
        )
    return None


#: All tensors of a weights file together read at most this many times the file's bytes (tied weights, slices).
MAX_READ_PER_STORED_BYTE = 2


def tensor_extent_problem(obj: Any, stored_bytes: int) -> str | None:
    """Why the tensors in `obj` (nested dicts / lists / tuples, as a weights file holds them) are not made of the
    `stored_bytes` bytes of their file, naming the first bad tensor by its key path, or None (see `_extent_problem`;
    in all, distinct views may read `MAX_READ_PER_STORED_BYTE` times the file's bytes + 1 MiB)."""
    stack, seen, views, total = [("", obj)], set(), set(), 0
    while stack:
        name, value = stack.pop()
        label = f"tensor '{name or '<root>'}'"
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized:
                return f"{label} is a {value.layout} / quantized tensor; weights files hold dense tensors"
            storage = value.untyped_storage()
            problem = _extent_problem(
                tuple(value.shape), value.stride(), value.storage_offset(), storage.nbytes() // value.element_size()
            )
            if problem:
                return f"{label} {problem}"
            view = (storage.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if view not in views:
                views.add(view)
                total += value.numel() * value.element_size()
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:  # shared / cyclic containers once
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(reversed([(f"{name}.{key}" if name else str(key), item) for key, item in items]))
    if total > MAX_READ_PER_STORED_BYTE * stored_bytes + (1 << 20):
        return (
            f"its tensors read {total} bytes but the file holds only {stored_bytes} (views that reuse the same stored "
            "bytes many times over)"
        )
    return None


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, torch.Tensor) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchScriptReadError("a tensor record that does not point at a storage")
    # a view inside its storage costs nothing; `tensor_extent_problem` then names repeated / overlapping ones
    problem = _bounds_problem(size, stride, storage_offset, storage.numel())
    if problem:
        raise TorchScriptReadError(f"a tensor {problem}")
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
    """True for a TorchScript archive (a zip with `<archive>/constants.pkl` or an `<archive>/code/` folder), whatever
    its extension. Only the level below the archive's own folder counts: `torch.save` names that folder after the
    file, so a plain `code.pt` holds `code/data.pkl` and is no TorchScript archive."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            _parts(name)[1:] == ["constants.pkl"] or (_parts(name)[1:2] == ["code"] and len(_parts(name)) > 2)
            for name in archive.namelist()
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
    problem = tensor_extent_problem(state, path.stat().st_size)
    if problem:
        raise TorchScriptReadError(problem)
    return state
