# SPDX-License-Identifier: Apache-2.0
"""A plain, unfused re-statement of the official MRAD computation, for parity tests only.

Written for clarity, in the official code's own structure (github.com/CROVO1026/MRAD at 1cc1c6b):
sequence-first (L, N, D) layout, a stacked `in_proj` weight, explicit softmax attention, the two paths as
separate attention computations, bank building with a per-image Python loop, `scipy.ndimage.gaussian_filter`
on a (1, H, W) numpy array and `torch.topk` for the score. It reads the same Hugging Face CLIP weights as the
production code but shares none of its functions, so a mismatch points at a real deviation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _in_proj(attention):
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], dim=0)
    bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias], dim=0)
    return weight, bias


def _multihead(x_nld, attention, vv: bool):
    """Official `Attention.forward` (DPAM) on (N, L, D): returns [x_vv, x_ori] or the plain output."""
    batch, length, width = x_nld.shape
    heads = attention.num_heads
    weight, bias = _in_proj(attention)
    qkv = (x_nld @ weight.t() + bias).reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (width // heads) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(batch, length, width)
    x_ori = attention.out_proj(x_ori)
    if not vv:
        return x_ori
    attn = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(batch, length, width)
    return [attention.out_proj(x), x_ori]


def _mlp(layer, x):
    return layer.mlp(x)


@torch.no_grad()
def reference_encode_image(clip, pixel_values, dpam_layer=None):
    """`VisionTransformer.forward` after `DAPM_replace(dpam_layer)`: returns (image_features, patch_tokens).

    image_features = x_ori[CLS] @ proj (no ln_post); patch_tokens = ln_post(x_vv)[:, 1:].
    """
    vision = clip.vision_model
    layers = vision.encoder.layers
    dpam_layer = len(layers) if dpam_layer is None else dpam_layer
    replaced = {len(layers) - i for i in range(1, dpam_layer)}  # resblocks[-1] ... resblocks[-(dpam_layer-1)]
    x = vision.embeddings.patch_embedding(pixel_values)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = vision.embeddings.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    table = vision.embeddings.position_embedding.weight
    side = int((table.shape[0] - 1) ** 0.5)
    new_side = int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        new_pos = table[1:, :].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
        new_pos = new_pos.reshape(-1, x.shape[-1], new_side * new_side).transpose(1, 2)
        table = torch.cat([table[:1, :], new_pos[0]], 0)
    x = vision.pre_layrnorm(x + table)
    x = x.permute(1, 0, 2)  # NLD -> LND, as the official code
    for index, layer in enumerate(layers):
        if index not in replaced:
            h = layer.layer_norm1(x).permute(1, 0, 2)
            x = x + _multihead(h, layer.self_attn, vv=False).permute(1, 0, 2)
            x = x + _mlp(layer, layer.layer_norm2(x))
        elif not isinstance(x, list):  # start of the dual path
            h = layer.layer_norm1(x).permute(1, 0, 2)
            x_res, x_ori_res = (t.permute(1, 0, 2) for t in _multihead(h, layer.self_attn, vv=True))
            x_ori = x + x_ori_res
            x_ori = x_ori + _mlp(layer, layer.layer_norm2(x_ori))
            x = [x + x_res, x_ori]
        else:
            x_vv, x_ori = x
            h = layer.layer_norm1(x_ori).permute(1, 0, 2)
            x_res, x_ori_res = (t.permute(1, 0, 2) for t in _multihead(h, layer.self_attn, vv=True))
            x_ori = x_ori + x_ori_res
            x_ori = x_ori + _mlp(layer, layer.layer_norm2(x_ori))
            x = [x_vv + x_res, x_ori]
    x_vv, x_ori = x
    image_features = x_ori[0, :, :] @ clip.visual_projection.weight.t()
    patch_tokens = vision.post_layernorm(x_vv.permute(1, 0, 2))[:, 1:, :]
    return image_features, patch_tokens


def reference_average_neighbor(x, kernels=(1, 3, 5)):
    batch, length, channels = x.shape
    side = int(length**0.5)
    x = x.transpose(1, 2).reshape(batch, channels, side, side)
    outs = [F.avg_pool2d(x, kernel_size=k, stride=1, padding=k // 2) for k in kernels]
    out = sum(outs) / len(outs)
    return out.flatten(2).transpose(1, 2)


@torch.no_grad()
def reference_build_banks(clip, pixel_batches, label_batches, mask_batches):
    """`build_cache_model` + `build_patch_cache_model` on preprocessed batches (masks (B, S, S) in [0, 1])."""
    image_keys, image_labels, patch_keys, patch_labels = [], [], [], []
    for images, labels, gt in zip(pixel_batches, label_batches, mask_batches):
        image_features, patch_tokens = reference_encode_image(clip, images)
        image_keys.append(image_features / image_features.norm(dim=-1, keepdim=True))
        image_labels.append(labels)
        gt = gt.clone()
        gt[gt > 0.5] = 1
        gt[gt <= 0.5] = 0
        patch_feature = reference_average_neighbor(patch_tokens)
        side = int(patch_feature.shape[1] ** 0.5)
        gt_resized = F.interpolate(gt.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False).squeeze(1)
        for i in range(images.size(0)):
            patch = patch_feature[i].view(side, side, -1)
            mask = gt_resized[i]
            pos_mask, neg_mask = mask == 1, mask == 0
            if pos_mask.sum() > 0:
                feature = patch[pos_mask].mean(dim=0, keepdim=True)
                patch_keys.append(feature / feature.norm(dim=-1, keepdim=True))
                patch_labels.append(torch.tensor([1]))
            if neg_mask.sum() > 0:
                feature = patch[neg_mask].mean(dim=0, keepdim=True)
                patch_keys.append(feature / feature.norm(dim=-1, keepdim=True))
                patch_labels.append(torch.tensor([0]))
    image_values = F.one_hot(torch.cat(image_labels).long(), num_classes=2).float()
    patch_values = F.one_hot(torch.cat(patch_labels).long(), num_classes=2).float()
    return torch.cat(image_keys), image_values, torch.cat(patch_keys), patch_values


@torch.no_grad()
def reference_tf_score(clip, pixel_values, image_keys, image_values, patch_keys, patch_values, image_size, k=0.7, sigma=4):
    """`test.py` with `--model_type mrad-tf`, batch size 1 per image: returns (maps (B, S, S) numpy, scores (B,))."""
    maps, scores = [], []
    for image in pixel_values.split(1):
        image_features, patch_tokens = reference_encode_image(clip, image)
        patch = reference_average_neighbor(patch_tokens)
        patch = patch / patch.norm(dim=-1, keepdim=True)
        weights = F.softmax(patch @ patch_keys.t(), dim=-1)
        seg = weights @ patch_values  # (1, G*G, 2)
        side = int(seg.shape[1] ** 0.5)
        sm = seg.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        sm = F.interpolate(sm, image_size, mode="bilinear").permute(0, 2, 3, 1)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        cls_probs = F.softmax(image_features @ image_keys.t(), dim=-1) @ image_values
        anomaly_map = torch.stack([sm[..., 1]])  # [1, 1, S, S] as the official list-of-layers stack
        anomaly_map = torch.stack([torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.cpu().numpy()], dim=0)
        anomaly_map = anomaly_map.sum(dim=0)
        flat = anomaly_map.flatten()
        top = torch.topk(flat, int(flat.shape[0] * 0.01))[0].mean()
        scores.append(((1 - k) * top + k * cls_probs[:, 1]).item())
        maps.append(anomaly_map[0].numpy())
    return np.stack(maps), np.array(scores)
