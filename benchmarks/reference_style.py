# SPDX-License-Identifier: Apache-2.0
"""The baseline of the benchmark: MRAD-TF inference written the way the official code runs it.

This is the "(a) reference-style" column of `benchmark_inference.py`, kept inside `benchmarks/` on purpose
(it shares no function with `mrad_hf`, so a speed-up or a difference cannot come from shared code). It
follows github.com/CROVO1026/MRAD at 1cc1c6b (`AnomalyCLIP_lib/AnomalyCLIP.py` `Attention.forward`,
`VisionTransformer.forward` after `DAPM_replace`, `test.py` with `--model_type mrad-tf`):

* fp32, one image at a time (the official DataLoader uses batch_size=1);
* sequence-first (L, N, D) residual stream, a stacked qkv projection per block;
* the two attentions as separate explicit `softmax(q k^T * scale) v` products, each followed by its own
  `out_proj` call;
* retrieval as a dense `softmax(q K^T) V`;
* post-processing on numpy: bilinear upsampling in torch, then `scipy.ndimage.gaussian_filter(sigma=4)`
  on the (1, H, W) array, then `torch.topk` over the top 1 % of pixels.

It reads the weights of a Hugging Face `CLIPModel` (the same random ViT-L/14 weights as "ours").
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

__all__ = ["reference_features", "reference_retrieve", "reference_postprocess", "reference_end_to_end"]


def _stacked_qkv(attention):
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], dim=0)
    bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias], dim=0)
    return weight, bias


def _attention(x_nld, attention, qkv_weight, qkv_bias, dual: bool):
    """The official DPAM `Attention.forward`: returns (x_vv, x_ori) when `dual`, else x_ori."""
    batch, length, width = x_nld.shape
    heads = attention.num_heads
    qkv = F.linear(x_nld, qkv_weight, qkv_bias).reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (width // heads) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = attention.out_proj((attn_ori @ v).transpose(1, 2).reshape(batch, length, width))
    if not dual:
        return None, x_ori
    attn = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_vv = attention.out_proj((attn @ v).transpose(1, 2).reshape(batch, length, width))
    return x_vv, x_ori


@torch.no_grad()
def reference_features(clip, pixel_values: torch.Tensor, vv_start_layer: int = 1):
    """(class embeds (B, P), patch tokens (B, G*G, W)) for one image at a time, as the official encode_image."""
    vision = clip.vision_model
    layers = vision.encoder.layers
    stacked = [_stacked_qkv(layer.self_attn) for layer in layers]  # built once, as the official weights are
    class_out, patch_out = [], []
    for image in pixel_values.split(1):
        x = vision.embeddings.patch_embedding(image)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = vision.embeddings.class_embedding + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
        )
        x = torch.cat([cls, x], dim=1)
        table = vision.embeddings.position_embedding.weight
        side, new_side = int((table.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
        if side != new_side:
            grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, (new_side, new_side), mode="bilinear").reshape(1, -1, new_side * new_side)
            table = torch.cat([table[:1], grid[0].t()], 0)
        x_ori = vision.pre_layrnorm(x + table).permute(1, 0, 2)  # NLD -> LND
        x_vv = None
        for index, layer in enumerate(layers):
            dual = index >= vv_start_layer
            h = layer.layer_norm1(x_ori).permute(1, 0, 2)
            vv_res, ori_res = _attention(h, layer.self_attn, *stacked[index], dual)
            if dual:
                x_vv = (x_ori if x_vv is None else x_vv) + vv_res.permute(1, 0, 2)
            x_ori = x_ori + ori_res.permute(1, 0, 2)
            x_ori = x_ori + layer.mlp(layer.layer_norm2(x_ori))
        class_out.append(x_ori[0] @ clip.visual_projection.weight.t())
        patch_out.append(vision.post_layernorm(x_vv.permute(1, 0, 2))[:, 1:])
    return torch.cat(class_out), torch.cat(patch_out)


def _average_neighbor(x, kernels=(1, 3, 5)):
    batch, length, channels = x.shape
    side = int(length**0.5)
    x = x.transpose(1, 2).reshape(batch, channels, side, side)
    return (sum(F.avg_pool2d(x, k, 1, k // 2) for k in kernels) / len(kernels)).flatten(2).transpose(1, 2)


@torch.no_grad()
def reference_retrieve(class_embeds, patch_tokens, image_keys, image_values, patch_keys, patch_values):
    """Image and patch retrieval, one image at a time: (image probs (B, 2), patch probs (B, G*G, 2))."""
    image_probs, patch_probs = [], []
    for cls, patches in zip(class_embeds.split(1), patch_tokens.split(1)):
        patch = _average_neighbor(patches)
        patch = patch / patch.norm(dim=-1, keepdim=True)
        patch_probs.append(F.softmax(patch @ patch_keys.t(), dim=-1) @ patch_values)
        cls = cls / cls.norm(dim=-1, keepdim=True)
        image_probs.append(F.softmax(cls @ image_keys.t(), dim=-1) @ image_values)
    return torch.cat(image_probs), torch.cat(patch_probs)


@torch.no_grad()
def reference_postprocess(patch_probs, image_anomaly, image_size: int, k: float = 0.7, sigma: float = 4):
    """Maps (B, S, S) and scores (B,) as `test.py`: upsample, numpy gaussian_filter, torch.topk."""
    maps, scores = [], []
    for seg, p_anomaly in zip(patch_probs.split(1), image_anomaly):
        side = int(seg.shape[1] ** 0.5)
        sm = F.interpolate(seg.reshape(1, side, side, -1).permute(0, 3, 1, 2), image_size, mode="bilinear").permute(
            0, 2, 3, 1
        )
        anomaly_map = torch.stack([sm[..., 1]])
        anomaly_map = torch.stack(
            [torch.from_numpy(gaussian_filter(m, sigma=sigma)) for m in anomaly_map.cpu().numpy()]
        ).sum(0)
        flat = anomaly_map.flatten()
        top = torch.topk(flat, int(flat.shape[0] * 0.01))[0].mean()
        scores.append(((1 - k) * top + k * p_anomaly).item())
        maps.append(anomaly_map[0])
    return torch.stack(maps), torch.tensor(scores)


def reference_end_to_end(
    clip, pixel_values, bank, image_size: int, vv_start_layer: int = 1, timings: dict | None = None
):
    """Features, retrieval and post-processing, image by image (`bank`: image_keys, image_values, patch_keys, patch_values).

    Returns (maps (B, S, S), scores (B,), class embeds (B, P), patch tokens (B, G*G, W)); if `timings` is a dict,
    the seconds spent in each part are added to its "features", "retrieval" and "postprocessing" entries.
    """
    timings = {} if timings is None else timings
    maps, scores, classes, patches = [], [], [], []
    for image in pixel_values.split(1):
        start = time.perf_counter()
        class_embeds, patch_tokens = reference_features(clip, image, vv_start_layer)
        middle = time.perf_counter()
        image_probs, patch_probs = reference_retrieve(class_embeds, patch_tokens, *bank)
        end = time.perf_counter()
        image_map, score = reference_postprocess(patch_probs, image_probs[:, 1], image_size)
        for key, seconds in (
            ("features", middle - start),
            ("retrieval", end - middle),
            ("postprocessing", time.perf_counter() - end),
        ):
            timings[key] = timings.get(key, 0.0) + seconds
        maps.append(image_map)
        scores.append(score)
        classes.append(class_embeds)
        patches.append(patch_tokens)
    return torch.cat(maps), torch.cat(scores), torch.cat(classes), torch.cat(patches)
