# SPDX-License-Identifier: Apache-2.0
"""From patch probabilities to an anomaly map and an image score (paper Sec. 3.3), on the tensor's device.

As the reference (`test.py`), per image: upsample **both channels** of the (G*G, 2) patch probabilities bilinearly
(align_corners=False) to the input size and take the anomaly channel; smooth it like `scipy.ndimage.gaussian_filter
(sigma=4)` ("reflect" padding, truncate 4: a separable convolution equal to scipy's to float rounding, batched); score
= (1 - k) * mean(top int(H*W*0.01) pixels) + k * p_anomaly(image retrieval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample_patch_probabilities", "gaussian_kernel1d", "gaussian_blur", "top_k_mean", "fuse_image_score"]


def upsample_patch_probabilities(
    patch_probabilities: torch.Tensor, grid_size: int, output_size: int | tuple[int, int]
) -> torch.Tensor:
    """(B, G*G, C) patch probabilities -> (B, C, H, W) maps, bilinear, align_corners=False (the reference)."""
    batch, num_tokens, channels = patch_probabilities.shape
    if num_tokens != grid_size * grid_size:
        raise ValueError(f"Expected {grid_size * grid_size} patches, got {num_tokens}.")
    grid = patch_probabilities.reshape(batch, grid_size, grid_size, channels).permute(0, 3, 1, 2)
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    return F.interpolate(grid, size=output_size, mode="bilinear", align_corners=False)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _reflect_indices(length: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-`length` axis padded by `radius` in scipy's "reflect" (d c b a | a b c d | d c b a) mode."""
    positions = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


def gaussian_blur(
    maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, *, batch_invariant: bool = False
) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(mode="reflect") of (B, H, W) maps in their float dtype (sigma 0: unchanged);
    `batch_invariant` blurs map by map (oneDNN picks the convolution algorithm by the batch size)."""
    if sigma == 0:
        return maps
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W) maps, got shape {tuple(maps.shape)}.")
    if batch_invariant and maps.shape[0] > 1:
        return torch.cat([gaussian_blur(single, sigma, truncate) for single in maps.split(1)])
    compute_dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    weights = gaussian_kernel1d(sigma, truncate, device=maps.device).to(compute_dtype)
    radius = (weights.numel() - 1) // 2
    batch, height, width = maps.shape
    x = maps.to(compute_dtype).unsqueeze(1)
    x = x.index_select(2, _reflect_indices(height, radius, maps.device))
    x = F.conv2d(x, weights.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_indices(width, radius, maps.device))
    x = F.conv2d(x, weights.view(1, 1, 1, -1))
    return x.squeeze(1).to(maps.dtype)


def top_k_mean(maps: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the int(H*W*ratio) largest pixels of each (B, H, W) map (at least one pixel)."""
    flat = maps.flatten(1)
    count = max(1, int(flat.shape[1] * ratio))
    return torch.topk(flat, count, dim=1).values.mean(dim=1)


def fuse_image_score(
    anomaly_maps: torch.Tensor,
    image_anomaly_probability: torch.Tensor,
    *,
    weight: float = 0.7,
    top_k_ratio: float = 0.01,
    fusion: str = "weighted",
) -> torch.Tensor:
    """ "weighted" (reference): (1 - weight) * top_k_mean(map) + weight * p_anomaly; "sum" (the paper): their sum."""
    pixel_term = top_k_mean(anomaly_maps, top_k_ratio)
    if fusion == "weighted":
        return (1.0 - weight) * pixel_term + weight * image_anomaly_probability
    if fusion == "sum":
        return pixel_term + image_anomaly_probability
    raise ValueError(f"Unknown score fusion {fusion!r}; use 'weighted' or 'sum'.")
