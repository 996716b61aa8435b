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
def reference_tf_score(
    clip, pixel_values, image_keys, image_values, patch_keys, patch_values, image_size, k=0.7, sigma=4
):
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
        anomaly_map = torch.stack(
            [torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.cpu().numpy()], dim=0
        )
        anomaly_map = anomaly_map.sum(dim=0)
        flat = anomaly_map.flatten()
        top = torch.topk(flat, int(flat.shape[0] * 0.01))[0].mean()
        scores.append(((1 - k) * top + k * cls_probs[:, 1]).item())
        maps.append(anomaly_map[0].numpy())
    return np.stack(maps), np.array(scores)


# ---------------------------------------------------------------------- MRAD-FT and MRAD-CLIP (train.py, test.py, mrad.py)
def reference_compute_score(image_features, cache_keys, cache_values, proj=None, need_mask=False):
    """`mrad.compute_socre`: proj is (mlp1, mlp2) or None; masks the projected logits by the unprojected top 5%."""
    ori_sim_weights = image_features @ cache_keys.t()
    if proj is not None:
        sim_weights = proj[0](image_features) @ proj[1](cache_keys).t()
    else:
        sim_weights = ori_sim_weights
    if need_mask:
        th = torch.quantile(ori_sim_weights, 0.95, dim=-1, keepdim=True)
        sim_weights = sim_weights.masked_fill(ori_sim_weights > th, float("-inf"))
    return F.softmax(sim_weights, dim=-1) @ cache_values.float()


def reference_compute_patch_score(
    patch_features, cache_keys, cache_values, proj=None, need_mask=False, patch_projection=None, anomaly_threshold=0.5
):
    """`mrad.compute_patch_socre`: returns (logits (B, L, 2), region tokens (B, 2, P) [normal, anomaly] or None)."""
    ori_sim_weights = patch_features @ cache_keys.t()
    if proj is not None:
        sim_weights = proj[0](patch_features) @ proj[1](cache_keys).T
    else:
        sim_weights = ori_sim_weights
    if need_mask:
        th = torch.quantile(ori_sim_weights, 0.8, dim=-1, keepdim=True)
        sim_weights = sim_weights.masked_fill(ori_sim_weights > th, float("-inf"))
    logits = F.softmax(sim_weights, dim=-1) @ cache_values.float()
    if patch_projection is None:
        return logits, None
    anomaly_area = (logits[:, :, 1] > anomaly_threshold).float()
    normal_area = 1.0 - anomaly_area
    anomaly_mask, normal_mask = anomaly_area.unsqueeze(-1), normal_area.unsqueeze(-1)
    anomaly_token = (patch_projection * anomaly_mask).sum(dim=1) / anomaly_mask.sum(dim=1).clamp(min=1.0)
    normal_token = (patch_projection * normal_mask).sum(dim=1) / normal_mask.sum(dim=1).clamp(min=1.0)
    anomaly_token[anomaly_mask.sum(dim=1).squeeze(-1) == 0] = 0.0
    normal_token[normal_mask.sum(dim=1).squeeze(-1) == 0] = 0.0
    return logits, torch.stack([normal_token, anomaly_token], dim=1)


def reference_encode_image_projected(clip, pixel_values):
    """The official `patch_token_proj`: ln_post(x_vv)[:, 1:] @ proj."""
    image_features, patch_tokens = reference_encode_image(clip, pixel_values)
    return image_features, patch_tokens, patch_tokens @ clip.visual_projection.weight.t()


def reference_encode_text_learn(clip, ctx_pos, ctx_neg, bias, token_ids, deep_prompts, n_ctx):
    """`AnomalyCLIP_PromptLearner.forward` + `encode_text_learn` at CLIP's full context length, LND layout.

    token_ids: (2, T_max) zero-padded ids (normal, anomalous); deep_prompts: list of (t, D) tensors (cast to fp16 on
    insertion, as the reference does). Returns (B, 2, P) text features, not normalised.
    """
    text = clip.text_model
    batch = bias.shape[0]
    embedding = text.embeddings.token_embedding(token_ids)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
    prompts = []
    for state, ctx in enumerate((ctx_pos, ctx_neg)):
        ctx_b = ctx.unsqueeze(0) + bias[:, state].unsqueeze(1)
        prompts.append(
            torch.cat([prefix[state].expand(batch, -1, -1), ctx_b, suffix[state].expand(batch, -1, -1)], dim=1)
        )
    x = torch.stack(prompts, dim=1).reshape(batch * 2, token_ids.shape[1], -1)
    x = x + text.embeddings.position_embedding.weight[: x.shape[1]]
    x = x.permute(1, 0, 2)  # LND
    length = x.shape[0]
    attn_mask = torch.empty(length, length).fill_(float("-inf")).triu_(1)
    counter = 0
    for index, layer in enumerate(text.encoder.layers):
        if index > 0 and counter <= len(deep_prompts) - 1:
            t = deep_prompts[counter].shape[0]
            context = deep_prompts[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2).half()
            x = torch.cat([x[:1], context, x[1 + t :]], dim=0)
            counter += 1
        h = layer.layer_norm1(x).permute(1, 0, 2)
        attention = layer.self_attn
        heads, width = attention.num_heads, h.shape[-1]
        weight, bias_in = _in_proj(attention)
        qkv = (
            (h @ weight.t() + bias_in).reshape(h.shape[0], h.shape[1], 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5 + attn_mask).softmax(dim=-1)
        out = attention.out_proj((weights @ v).transpose(1, 2).reshape(h.shape[0], h.shape[1], width))
        x = x + out.permute(1, 0, 2)
        x = x + layer.mlp(layer.layer_norm2(x))
    x = text.final_layer_norm(x.permute(1, 0, 2))
    ids = token_ids.unsqueeze(0).expand(batch, -1, -1).reshape(batch * 2, -1)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ clip.text_projection.weight.t()
    return x.reshape(batch, 2, -1)


def _reference_map_and_score(anomaly_map_1hw, cls_probability, k=0.7, sigma=4):
    anomaly_map = torch.stack([anomaly_map_1hw])  # the official list of layers: (1, 1, S, S)
    anomaly_map = torch.stack(
        [torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.detach().cpu().numpy()], dim=0
    )
    anomaly_map = anomaly_map.sum(dim=0)
    flat = anomaly_map.flatten()
    top = torch.topk(flat, int(flat.shape[0] * 0.01))[0].mean()
    return anomaly_map[0].numpy(), ((1 - k) * top + k * cls_probability).item()


@torch.no_grad()
def reference_trained_score(clip, pixel_values, banks, image_proj, patch_proj, image_size, prompt=None):
    """`test.py` with `--model_type mrad-ft` (prompt None) or `mrad-clip`, one image at a time.

    banks: (image_keys, image_values, patch_keys, patch_values); image_proj/patch_proj: (query, key) Linear pairs;
    prompt: dict(ctx_pos, ctx_neg, deep_prompts (list), token_ids (2, T), n_ctx, prompt_proj=(mlp1, mlp2)).
    """
    image_keys, image_values, patch_keys, patch_values = banks
    maps, scores = [], []
    for image in pixel_values.split(1):
        image_features, patch_tokens, patch_proj_tokens = reference_encode_image_projected(clip, image)
        projection = reference_average_neighbor(patch_proj_tokens)
        projection = projection / projection.norm(dim=-1, keepdim=True)
        patch = reference_average_neighbor(patch_tokens)
        patch = patch / patch.norm(dim=-1, keepdim=True)
        seg, regions = reference_compute_patch_score(
            patch,
            patch_keys,
            patch_values,
            proj=patch_proj,
            patch_projection=projection if prompt is not None else None,
        )
        side = int(seg.shape[1] ** 0.5)

        def upsample(sm):
            sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
            return F.interpolate(sm, image_size, mode="bilinear").permute(0, 2, 3, 1)

        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        cls_probs = reference_compute_score(image_features, image_keys, image_values, proj=image_proj)
        if prompt is None:
            anomaly_map = upsample(seg)[..., 1]
        else:
            mlp1, mlp2 = prompt["prompt_proj"]
            bias = torch.stack([mlp1(regions[:, 0, :]), mlp2(regions[:, 1, :])], dim=1)
            text = reference_encode_text_learn(
                clip,
                prompt["ctx_pos"],
                prompt["ctx_neg"],
                bias,
                prompt["token_ids"],
                prompt["deep_prompts"],
                prompt["n_ctx"],
            ).float()
            text = text / text.norm(dim=-1, keepdim=True)
            similarity = ((projection @ text.transpose(1, 2)) / 0.07).softmax(-1)
            sm = upsample(similarity)
            anomaly_map = (sm[..., 1] + 1 - sm[..., 0]) / 2.0
        anomaly_map, score = _reference_map_and_score(anomaly_map, cls_probs[:, 1])
        maps.append(anomaly_map)
        scores.append(score)
    return np.stack(maps), np.array(scores)


def reference_focal_loss(logit, target, gamma=2, smooth=1e-5):
    """`utils/loss.FocalLoss` (alpha None, inputs already probabilities)."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), logit.size(1), -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = target.view(-1, 1)
    idx = target.cpu().long()
    one_hot_key = torch.zeros(target.size(0), num_class).scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    return (-1 * torch.pow((1 - pt), gamma) * pt.log()).mean()


def reference_dice_loss(inputs, targets):
    """`utils/loss.BinaryDiceLoss`."""
    n = targets.size()[0]
    input_flat, targets_flat = inputs.view(n, -1), targets.view(n, -1)
    intersection = input_flat * targets_flat
    dice = (2 * intersection.sum(1) + 1) / (input_flat.sum(1) + targets_flat.sum(1) + 1)
    return 1 - dice.sum() / n
