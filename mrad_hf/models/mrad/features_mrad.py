# SPDX-License-Identifier: Apache-2.0
"""MRAD's dual-path CLIP features over the weights of a Hugging Face `CLIPModel` (paper Sec. 3.1).

One pass of the frozen vision tower gives the **original path**'s class token, projected *without* `post_layernorm`
(a reference quirk, kept by default): the image-level query/key; and the **V-V path** (CLIP-Surgery / AnomalyCLIP
"DPAM": from block `vv_start_layer` on, self-attention whose query, key and value are all the V projection of the
block's `layer_norm1` output, no MLP), whose tokens after `post_layernorm` are the pixel-level queries/keys. Both
attentions of a block are one call of transformers' attention interface (per `_attn_implementation`) and share one
`out_proj`; the last block computes the class row only; the positional table is resized bilinearly (the reference;
transformers' is bicubic) and never updated in place (the reference overwrites it). On AVX-512 CPUs the linears run
through oneDNN with weights packed once per weight version (~2.3x MKL there), exact fp32 either way.
`batch_invariant=True` uses per-image products wherever a CPU kernel picks its algorithm by the batch size.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward

from .retrieval_mrad import rowwise_linear

__all__ = [
    "MRADVisionFeatures",
    "interpolate_position_embeddings",
    "neighbor_average",
    "dual_path_vision_features",
    "linear_backend",
    "LINEAR_BACKENDS",
]

LINEAR_BACKENDS = ("auto", "aten", "onednn")


@dataclass
class MRADVisionFeatures:
    """One dual-path pass on a G x G grid: `class_embeds` (B, P) projected class tokens and `patch_tokens` (B, G*G, W)
    V-V tokens of `feature_layer` after `post_layernorm`, both unnormalised (P 768, W 1024 for ViT-L)."""

    class_embeds: torch.Tensor
    patch_tokens: torch.Tensor
    grid_size: int


# ---------------------------------------------------------------------- linear-layer backend (run time)
def linear_backend(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The linears' backend: "onednn" (packed oneDNN weights: CPU fp32, or bf16 on AVX-512) or "aten" (`F.linear`);
    oneDNN on AVX-512 CPUs only, unless `MRAD_LINEAR_BACKEND=aten|onednn` forces one (where possible)."""
    choice = os.environ.get("MRAD_LINEAR_BACKEND", "auto").lower()
    if choice not in LINEAR_BACKENDS:
        raise ValueError(f"MRAD_LINEAR_BACKEND={choice!r}; use one of {LINEAR_BACKENDS}.")
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    possible = (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and avx512))
    )
    return "onednn" if possible and (choice == "onednn" or (choice == "auto" and avx512)) else "aten"


_PACKED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_weight(linear: nn.Linear) -> torch.Tensor:
    """The oneDNN-packed `linear.weight`, cached per weight version outside the module (state_dict never sees it)."""
    weight = linear.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
    cached = _PACKED_WEIGHTS.get(linear)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _PACKED_WEIGHTS[linear] = cached
    return cached[1]


def _linear(linear: nn.Linear, x: torch.Tensor, backend: str) -> torch.Tensor:
    """`linear(x)` through the backend (oneDNN only without autograd, outside torch.compile, export and autocast)."""
    if (
        backend == "onednn"
        and x.device.type == "cpu"
        and x.dtype == linear.weight.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(linear), linear.bias, "none", [], "")
    return linear(x)


# ---------------------------------------------------------------------- pure helpers
def interpolate_position_embeddings(
    position_table: torch.Tensor, grid_size: int, mode: str = "bilinear"
) -> torch.Tensor:
    """A CLIP positional table (1 + S*S, W) resized to (1 + G*G, W), class row kept (align_corners=False, no
    antialiasing, as the reference)."""
    num_patches = position_table.shape[0] - 1
    source_side = math.isqrt(num_patches)
    if source_side * source_side != num_patches:
        raise ValueError(f"Positional table with {num_patches} patch rows is not a square grid.")
    if source_side == grid_size:
        return position_table
    width = position_table.shape[-1]
    grid = position_table[1:].reshape(1, source_side, source_side, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode=mode, align_corners=False)
    grid = grid.reshape(width, grid_size * grid_size).transpose(0, 1)
    return torch.cat([position_table[:1], grid], dim=0)


def neighbor_average(tokens: torch.Tensor, grid_size: int, kernel_sizes: list[int] | tuple[int, ...]) -> torch.Tensor:
    """MRAD's `average_neighbor` of (B, G*G, C) tokens: the mean over kernels k of stride-1 k x k average pools, the
    zero padding counted (border tokens damped, as the reference)."""
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid_size * grid_size:
        raise ValueError(
            f"Expected {grid_size * grid_size} tokens for a {grid_size}x{grid_size} grid, got {num_tokens}."
        )
    grid = tokens.transpose(1, 2).reshape(batch, channels, grid_size, grid_size)
    pooled = [F.avg_pool2d(grid, kernel_size=k, stride=1, padding=k // 2) for k in kernel_sizes]
    averaged = sum(pooled) / len(pooled)
    return averaged.flatten(2).transpose(1, 2).contiguous()  # one layout for any batch size: same norm order


# ---------------------------------------------------------------------- the dual-path pass
def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v of (B, H, L, D) inputs through transformers' attention interface -> (B, Lq, H * D)."""
    implementation = getattr(attention.config, "_attn_implementation", None) or "eager"
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)  # eager: the default
    attended, _ = interface(attention, query, key, value, None, scaling=attention.scale, dropout=0.0, is_causal=False)
    batch, length = attended.shape[:2]
    return attended.reshape(batch, length, -1)  # the interface returns (B, Lq, H, D)


def _block_attention(
    attention: nn.Module,
    normed: torch.Tensor,
    with_vv: bool,
    class_only: bool = False,
    *,
    batch_invariant: bool = False,
    backend: str = "aten",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(original attention, V-V attention or None) of one CLIP attention module, after `out_proj`: one attention call
    on a doubled batch and one `out_proj` for both; `class_only` computes the original one for the class row alone."""
    num_heads = attention.num_heads
    key = _split_heads(_linear(attention.k_proj, normed, backend), num_heads)
    value = _split_heads(_linear(attention.v_proj, normed, backend), num_heads)
    if class_only and batch_invariant:
        # the class row alone, with one product per image: its result does not depend on the batch (rowwise_linear);
        # explicit products and sums, since a batched matmul with one query row picks batch-size-dependent kernels
        query = _split_heads(rowwise_linear(attention.q_proj, normed[:, 0]).unsqueeze(1), num_heads)
        weights = torch.softmax((query * key).sum(dim=-1, keepdim=True).transpose(-2, -1) * attention.scale, dim=-1)
        original = (weights.transpose(-2, -1) * value).sum(dim=-2, keepdim=True)
        if not with_vv:
            return rowwise_linear(attention.out_proj, _merge_heads(original)[:, 0]).unsqueeze(1), None
        value = value.contiguous()  # a strided view picks batch-size-dependent SDPA paths; contiguous input does not
        vv = _attend(attention, value, value, value)
        merged = torch.cat([_merge_heads(original), vv], dim=1)
        # one out_proj per image: the row count (1 + L) then never depends on the batch, which GEMM kernels can see
        projected = torch.cat([_linear(attention.out_proj, image, backend) for image in merged.split(1)])
        return projected[:, :1], projected[:, 1:]
    query = _split_heads(_linear(attention.q_proj, normed[:, :1] if class_only else normed, backend), num_heads)
    if not with_vv:
        return _linear(attention.out_proj, _attend(attention, query, key, value), backend), None
    if class_only:  # the class row's attention and the V-V attention through one out_proj
        merged = torch.cat([_attend(attention, query, key, value), _attend(attention, value, value, value)], dim=1)
        projected = _linear(attention.out_proj, merged, backend)
        return projected[:, :1], projected[:, 1:]
    attended = _attend(attention, torch.cat([query, value]), torch.cat([key, value]), torch.cat([value, value]))
    projected = _linear(attention.out_proj, attended, backend)  # slices, not chunk(2): no guard on a free batch
    return projected[: normed.shape[0]], projected[normed.shape[0] :]


def _mlp(mlp: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    return _linear(mlp.fc2, mlp.activation_fn(_linear(mlp.fc1, x, backend)), backend)


def dual_path_vision_features(
    vision_model: nn.Module,
    visual_projection: nn.Module,
    pixel_values: torch.Tensor,
    *,
    vv_start_layer: int = 1,
    feature_layer: int = -1,
    position_interpolation: str = "bilinear",
    class_key_post_layernorm: bool = False,
    batch_invariant: bool = False,
    backend: str | None = None,
) -> MRADVisionFeatures:
    """One pass of the frozen tower (`CLIPModel.vision_model` and `.visual_projection`) over (B, 3, S, S) normalised
    pixels (S a multiple of the patch size) -> MRAD's image- and pixel-level features. The keywords are the
    `MRADConfig` fields of the same names; `backend` ("aten" / "onednn") defaults to `linear_backend`'s choice."""
    embeddings = vision_model.embeddings
    layers = vision_model.encoder.layers
    num_layers = len(layers)
    feature_layer = feature_layer % num_layers
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}.")
    height, width = pixel_values.shape[-2:]
    patch = embeddings.patch_size
    if height != width or height % patch:
        raise ValueError(f"pixel_values must be square with a side divisible by {patch}, got {height}x{width}.")
    grid_size = height // patch
    target_dtype = embeddings.patch_embedding.weight.dtype
    if backend is None:
        backend = linear_backend(pixel_values.device, target_dtype)

    patches = embeddings.patch_embedding(pixel_values.to(target_dtype)).flatten(2).transpose(1, 2)
    class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    positions = interpolate_position_embeddings(
        embeddings.position_embedding.weight, grid_size, position_interpolation
    )
    hidden = vision_model.pre_layrnorm(torch.cat([class_token, patches], dim=1) + positions.to(patches.dtype))

    vv_hidden = hidden if vv_start_layer == 0 else None
    for index, layer in enumerate(layers):
        with_vv = vv_start_layer <= index <= feature_layer  # later blocks only feed the class token
        # the last block's only output read is the class row: query, residual and MLP on it alone (~3% fewer FLOPs)
        class_only = index == num_layers - 1 and index + 1 != vv_start_layer
        original, vv = _block_attention(
            layer.self_attn,
            layer.layer_norm1(hidden),
            with_vv,
            class_only,
            batch_invariant=batch_invariant,
            backend=backend,
        )
        if with_vv:
            vv_hidden = vv_hidden + vv
        if class_only:
            hidden = hidden[:, :1]
        hidden = hidden + original
        if class_only and batch_invariant:  # one row per image: per-image products (rowwise_linear)
            mlp, row = layer.mlp, layer.layer_norm2(hidden)[:, 0]
            hidden = hidden + rowwise_linear(mlp.fc2, mlp.activation_fn(rowwise_linear(mlp.fc1, row))).unsqueeze(1)
        else:
            hidden = hidden + _mlp(layer.mlp, layer.layer_norm2(hidden), backend)
        if index + 1 == vv_start_layer:
            vv_hidden = hidden

    class_state = hidden[:, 0]
    if class_key_post_layernorm:
        class_state = vision_model.post_layernorm(class_state)
    class_embeds = (
        rowwise_linear(visual_projection, class_state) if batch_invariant else visual_projection(class_state)
    )
    return MRADVisionFeatures(class_embeds, vision_model.post_layernorm(vv_hidden)[:, 1:], grid_size)
