# SPDX-License-Identifier: Apache-2.0
"""Run-time choices for speed (issue 15): what the machine offers, the backbone dtype, the allocator, compilation.

Layer 1: used by the CLI, the scoring loop and the benchmarks; the model itself (layer 0) needs none of it. Every
choice is made when the program runs, from what this CPU or GPU offers:

* `cpu_features()`: torch's CPU capability, the AVX/AMX flags, the model name (recorded with every benchmark number).
* `resolve_dtype("auto", device)`: bfloat16 on GPUs and on CPUs with bf16 matrix units (AVX512-BF16 / AMX), float32
  elsewhere: without them (AVX2-only CPUs) bf16 measured several times *slower* than float32.
* `set_backbone_dtype(model, dtype)`: only the CLIP tower changes dtype (cast, or `torch.autocast` over float32
  weights); memory, retrieval, maps and scores stay float32 (`modeling_mrad.MRADFloat32Module`).
* `tune_malloc_for_inference()`: glibc settings that stop batch activations being re-mapped in every layer.
* `compile_features(model)`: opt-in `torch.compile` of the feature pass.

The linear-layer backend (oneDNN pre-packed weights on AVX-512, `F.linear` elsewhere) and the attention kernel are
chosen inside the model (`features_mrad.linear_backend`), because they apply wherever the model runs.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import nn

from .models.mrad.features_mrad import MRADVisionFeatures

__all__ = [
    "BACKBONE_DTYPES",
    "cpu_features",
    "resolve_dtype",
    "set_backbone_dtype",
    "tune_malloc_for_inference",
    "compile_features",
]

#: Dtypes the CLIP tower may run in.
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict:
    """The CPU facts the kernel choices depend on: torch's capability ("AVX2", "AVX512", ...), bf16 flags, model.

    `bf16_matrix` is True with AVX512-BF16 or AMX-BF16 (where bfloat16 GEMMs beat float32); read from
    /proc/cpuinfo on Linux, False where it cannot be read.
    """
    flags: set[str] = set()
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "bf16_matrix": bool({"avx512_bf16", "amx_bf16"} & flags),
    }


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The CLIP tower's dtype: "auto" picks bfloat16 on CUDA (float16 where bf16 is unsupported) and on CPUs with
    bf16 matrix units (AVX512-BF16 / AMX), float32 elsewhere; names ("bfloat16") and torch dtypes pass through;
    None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in BACKBONE_DTYPES.values():
            raise ValueError(f"Unsupported backbone dtype {dtype}; use one of {sorted(BACKBONE_DTYPES)} or 'auto'.")
        return dtype
    if dtype == "auto":
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_features()["bf16_matrix"]:
            return torch.bfloat16
        return torch.float32
    if dtype not in BACKBONE_DTYPES:
        raise ValueError(f"Unknown backbone dtype {dtype!r}; use one of {sorted(BACKBONE_DTYPES)} or 'auto'.")
    return BACKBONE_DTYPES[dtype]


def set_backbone_dtype(model: nn.Module, dtype: str | torch.dtype | None, *, mode: str = "cast"):
    """Run an MRAD model's CLIP tower in `dtype` while its memory, retrieval and scoring stay float32.

    `dtype`: "float32", "bfloat16", "float16", a torch dtype, "auto" (`resolve_dtype` on the model's device) or None
    (unchanged). `mode="cast"` casts only `model.clip` (in place; returns the model), the same as `model.to(dtype)` or
    `from_pretrained(..., dtype=...)`. `mode="autocast"` keeps float32 weights and runs the feature pass under
    `torch.autocast(dtype)` (the GPU habit; its outputs are cast to float32). The backbone fingerprint does not depend
    on the dtype, so banks built with the float32 backbone still attach after the cast.
    """
    if dtype is None:
        return model
    if mode not in ("cast", "autocast"):
        raise ValueError(f"Unknown mode {mode!r}; use 'cast' or 'autocast'.")
    dtype = resolve_dtype(dtype, next(model.clip.parameters()).device)
    current = model.__dict__.get("extract_features")
    if getattr(current, "_mrad_autocast", False):  # undo an earlier autocast wrapper, back to what it wrapped
        del model.extract_features
        if current._mrad_inner is not None:
            model.extract_features = current._mrad_inner
    if mode == "cast" or dtype == torch.float32:
        model.clip.to(dtype if mode == "cast" else torch.float32)
        return model
    model.clip.to(torch.float32)
    inner = model.__dict__.get("extract_features")  # e.g. a compile_features pass, which autocast then wraps
    plain = inner or type(model).extract_features.__get__(model)

    def extract_features(pixel_values: torch.Tensor) -> MRADVisionFeatures:
        with torch.autocast(pixel_values.device.type, dtype=dtype):
            features = plain(pixel_values)
        return MRADVisionFeatures(features.class_embeds.float(), features.patch_tokens.float(), features.grid_size)

    extract_features._mrad_autocast, extract_features._mrad_inner = True, inner
    model.extract_features = extract_features
    return model


def tune_malloc_for_inference() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS (Linux/glibc only).

    A ViT-L activation at batch 8 (8 x 1370 x 4096 floats, 180 MB) is above glibc's largest mmap threshold (32 MiB),
    so without this every layer maps fresh pages and faults on each 4 KiB of them (measured 0.4-1.2 M page faults per
    image at batch 8, none at batch 1: batch 8 was 21-32 % slower per image). `mallopt(M_MMAP_MAX, 0)` serves large
    blocks from the heap and `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)` (mallopt's int limit) keeps the heap's top
    mapped, so they are re-used. Cost: the process keeps its peak heap until it exits (fine for inference processes).
    Applies to allocations made after the call. The same as starting with `MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647`. Returns True where applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def compile_features(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Opt-in `torch.compile` of an MRAD model's feature pass (the instance's `extract_features`; returns the model).

    Measured on CPU in `benchmarks/benchmark_inference.py --stages compile`; CUDA graphs ("reduce-overhead") are
    untested (no GPU was lent to this work). The compiled path uses `F.linear` (the oneDNN side cache is skipped
    while compiling).
    """
    compile_kwargs.setdefault("dynamic", False)
    model.extract_features = torch.compile(type(model).extract_features.__get__(model), **compile_kwargs)
    return model
