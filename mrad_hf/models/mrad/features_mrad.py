# SPDX-License-Identifier: Apache-2.0
"""MRAD's dual-path CLIP features over the weights of a Hugging Face `CLIPModel` (paper Sec. 3.1).

MRAD keeps CLIP frozen and reads two things from one pass of the vision tower:

* the **original path** (plain CLIP blocks) gives the class token; its projection *without*
  `post_layernorm` is the image-level query/key (a quirk of the reference code, kept by default);
* the **V-V path** (CLIP-Surgery / AnomalyCLIP "DPAM") starts at block `vv_start_layer` from the
  original path's hidden state and, in every later block, adds a self-attention in which query, key and
  value are all the V projection of the *original* path's `layer_norm1` output. It has no MLP. Its tokens
  after `post_layernorm` (not projected, 1024-d for ViT-L) are the pixel-level queries/keys.

Both attentions of a dual-path block go through one `scaled_dot_product_attention` call (the two
problems are stacked on the batch axis) and share one `out_proj` call; the last block computes the
original path for the class token only (nothing else of it is read). `set_backbone_dtype` is the opt-in
half-precision mode (CLIP tower in bf16/fp16, memory and scoring in fp32). The positional table is resized
bilinearly to the input grid (the reference; transformers' own `interpolate_pos_encoding` is bicubic).

Everything here is a pure function of the CLIP weights and the pixels: no state, no in-place updates of
the checkpoint (the reference overwrites its positional table on the first 518-px forward; we do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .retrieval_mrad import rowwise_linear

__all__ = [
    "MRADVisionFeatures",
    "interpolate_position_embeddings",
    "neighbor_average",
    "dual_path_vision_features",
    "BACKBONE_DTYPES",
    "set_backbone_dtype",
]

#: Dtypes the CLIP tower may run in. Half precision is opt-in: bfloat16 pays off on CPUs with bf16 matrix units
#: (AMX / AVX512-BF16) and on GPUs; without them (e.g. AVX2-only CPUs) it is several times *slower* than float32.
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MRADVisionFeatures:
    """What one dual-path pass produces. Shapes for a batch of B images on a G x G patch grid.

    Attributes:
        class_embeds: (B, P) projected class token of the original path (P = projection dim, 768 for ViT-L),
            not normalised.
        patch_tokens: (B, G*G, W) V-V tokens of `feature_layer` after `post_layernorm`, before neighbour
            averaging and normalisation (W = vision width, 1024 for ViT-L).
        grid_size: G.
    """

    class_embeds: torch.Tensor
    patch_tokens: torch.Tensor
    grid_size: int


def interpolate_position_embeddings(position_table: torch.Tensor, grid_size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a CLIP positional table (1 + S*S, W) to (1 + G*G, W), keeping the class row.

    `mode="bilinear"` uses `align_corners=False` and no antialiasing, as the reference does.
    """
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
    """MRAD's `average_neighbor`: mean over kernels k of a stride-1 k x k average pool on the token grid.

    Zero padding of k // 2 is counted in the average (`count_include_pad=True`), so border tokens are damped,
    exactly as the reference. Args: tokens (B, G*G, C). Returns (B, G*G, C).
    """
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid_size * grid_size:
        raise ValueError(f"Expected {grid_size * grid_size} tokens for a {grid_size}x{grid_size} grid, got {num_tokens}.")
    grid = tokens.transpose(1, 2).reshape(batch, channels, grid_size, grid_size)
    pooled = [F.avg_pool2d(grid, kernel_size=k, stride=1, padding=k // 2) for k in kernel_sizes]
    averaged = sum(pooled) / len(pooled)
    return averaged.flatten(2).transpose(1, 2).contiguous()  # one layout for any batch size: same norm order


def set_backbone_dtype(model: nn.Module, dtype: str | torch.dtype | None):
    """Run an MRAD model's CLIP tower in `dtype` while its memory, retrieval and scoring stay float32.

    Casts only `model.clip` (in place; returns the model). Queries are cast back with `.float()` before retrieval,
    so logits, softmax, maps and scores are float32. The same as `model.to(dtype)` or `from_pretrained(..., dtype=...)`,
    which leave the memory and heads float32 (`modeling_mrad.MRADFloat32Module`). `None` leaves the model unchanged. The backbone fingerprint does not depend on the dtype, so banks built with
    the float32 backbone still attach after the cast.
    """
    if dtype is None:
        return model
    if isinstance(dtype, str):
        if dtype not in BACKBONE_DTYPES:
            raise ValueError(f"Unknown backbone dtype {dtype!r}; use one of {sorted(BACKBONE_DTYPES)}.")
        dtype = BACKBONE_DTYPES[dtype]
    if dtype not in BACKBONE_DTYPES.values():
        raise ValueError(f"Unsupported backbone dtype {dtype}; use one of {sorted(BACKBONE_DTYPES)}.")
    model.clip.to(dtype)
    return model


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _block_attention(
    attention: nn.Module, normed: torch.Tensor, with_vv: bool, class_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Original q.k attention (and, if asked, the V-V attention) of one CLIP attention module.

    Both attentions read the same LN'd input; when both are needed they run as one SDPA call on a doubled
    batch and share one `out_proj` call. `class_only`: the original attention is computed for the class-token
    query alone (the last block, whose other original-path outputs nothing reads). Returns
    (original_out, vv_out or None), after `out_proj`.
    """
    num_heads = attention.num_heads
    # the class row alone (last block): one product per image, so its result does not depend on the batch size
    query = _split_heads(rowwise_linear(attention.q_proj, normed[:, 0]).unsqueeze(1) if class_only else attention.q_proj(normed), num_heads)
    key = _split_heads(attention.k_proj(normed), num_heads)
    value = _split_heads(attention.v_proj(normed), num_heads)
    if class_only:  # one query row: a plain softmax(q k^T) v (cheap, and bitwise reproducible across processes)
        # as explicit products and sums: a batched matmul with one query row picks batch-size-dependent kernels
        weights = torch.softmax((query * key).sum(dim=-1, keepdim=True).transpose(-2, -1) * attention.scale, dim=-1)
        original = (weights.transpose(-2, -1) * value).sum(dim=-2, keepdim=True)
        if not with_vv:
            return rowwise_linear(attention.out_proj, _merge_heads(original)[:, 0]).unsqueeze(1), None
        value = value.contiguous()  # a strided view picks batch-size-dependent SDPA paths; contiguous input does not
        vv = F.scaled_dot_product_attention(value, value, value, scale=attention.scale)
        merged = torch.cat([_merge_heads(original), _merge_heads(vv)], dim=1)
        # one out_proj per image: the row count (1 + L) then never depends on the batch, which GEMM kernels can see
        projected = torch.cat([attention.out_proj(image) for image in merged.split(1)])
        return projected[:, :1], projected[:, 1:]
    if not with_vv:
        attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
        return attention.out_proj(_merge_heads(attended)), None
    attended = F.scaled_dot_product_attention(
        torch.cat([query, value]), torch.cat([key, value]), torch.cat([value, value]), scale=attention.scale
    )
    original, vv = attention.out_proj(_merge_heads(attended)).chunk(2, dim=0)
    return original, vv


def dual_path_vision_features(
    vision_model: nn.Module,
    visual_projection: nn.Module,
    pixel_values: torch.Tensor,
    *,
    vv_start_layer: int = 1,
    feature_layer: int = -1,
    position_interpolation: str = "bilinear",
    class_key_post_layernorm: bool = False,
) -> MRADVisionFeatures:
    """Run the frozen CLIP vision tower once and return MRAD's image-level and pixel-level features.

    Args:
        vision_model: `CLIPModel.vision_model` (a `CLIPVisionModel`: embeddings, pre_layrnorm, encoder,
            post_layernorm).
        visual_projection: `CLIPModel.visual_projection`.
        pixel_values: (B, 3, H, W) normalised images; H = W must be a multiple of the patch size.
        vv_start_layer: first block (0-based) with a V-V path.
        feature_layer: block whose V-V tokens are returned (negative counts from the end).
        position_interpolation: "bilinear" (reference) or "bicubic".
        class_key_post_layernorm: apply `post_layernorm` to the class token before projecting.
    """
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
    patches = embeddings.patch_embedding(pixel_values.to(target_dtype)).flatten(2).transpose(1, 2)
    class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    positions = interpolate_position_embeddings(embeddings.position_embedding.weight, grid_size, position_interpolation)
    hidden = vision_model.pre_layrnorm(torch.cat([class_token, patches], dim=1) + positions.to(patches.dtype))

    vv_hidden = hidden if vv_start_layer == 0 else None
    for index, layer in enumerate(layers):
        # The V-V path runs from vv_start_layer to feature_layer; later blocks only feed the class token.
        with_vv = vv_start_layer <= index <= feature_layer
        # In the last block only the class token of the original path is read: attention query, residual and
        # MLP run on that row alone (row-wise operations, so the values are unchanged; ~3% fewer FLOPs for ViT-L).
        class_only = index == num_layers - 1 and index + 1 != vv_start_layer
        original, vv = _block_attention(layer.self_attn, layer.layer_norm1(hidden), with_vv, class_only)
        if with_vv:
            vv_hidden = vv_hidden + vv
        if class_only:
            hidden = hidden[:, :1]
        hidden = hidden + original
        if class_only:  # one row per image: per-image products keep it independent of the batch (rowwise_linear)
            mlp, row = layer.mlp, layer.layer_norm2(hidden)[:, 0]
            hidden = hidden + rowwise_linear(mlp.fc2, mlp.activation_fn(rowwise_linear(mlp.fc1, row))).unsqueeze(1)
        else:
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        if index + 1 == vv_start_layer:
            vv_hidden = hidden

    class_state = hidden[:, 0]
    if class_key_post_layernorm:
        class_state = vision_model.post_layernorm(class_state)
    class_embeds = rowwise_linear(visual_projection, class_state)
    patch_tokens = vision_model.post_layernorm(vv_hidden)[:, 1:]
    return MRADVisionFeatures(class_embeds=class_embeds, patch_tokens=patch_tokens, grid_size=grid_size)
