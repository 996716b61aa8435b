# SPDX-License-Identifier: Apache-2.0
"""Training losses of MRAD-FT and MRAD-CLIP (paper Sec. 3.4-3.5) as the reference computes them (`utils/loss.py`).

Pure functions of probabilities (not logits) and binary ground truth: the focal loss (gamma 2, one-hot target
clamped to [1e-5, 1 - 1e-5], pt = sum(onehot * p) + 1e-5, mean over every pixel), the dice loss, and the image
cross-entropy of the *retrieved probabilities* / 0.07 (a softmax of probabilities, as the reference), combined as
the two training stages do (`ft_loss`, `prompt_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "binary_dice_loss", "image_classification_loss", "ft_loss", "prompt_loss"]


def focal_loss(
    probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss of (B, C, H, W) class probabilities against a (B, H, W) class map; `smooth` is the label clamp and
    the epsilon added to pt (the reference's)."""
    num_classes = probabilities.shape[1]
    flat = probabilities.flatten(2).transpose(1, 2).reshape(-1, num_classes)
    one_hot = F.one_hot(target.reshape(-1).long(), num_classes).to(flat.dtype)
    one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def binary_dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over images of (2 sum(p g) + 1) / (sum(p) + sum(g) + 1); probability, target: (B, H, W)."""
    batch = target.shape[0]
    p = probability.reshape(batch, -1)
    g = target.reshape(batch, -1).to(p.dtype)
    dice = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)
    return 1.0 - dice.sum() / batch


def image_classification_loss(
    image_probabilities: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """cross_entropy(p / temperature, label) with p the (B, 2) retrieved image probabilities."""
    return F.cross_entropy(image_probabilities / temperature, labels.long())


def ft_loss(
    patch_probability_maps: torch.Tensor,
    masks: torch.Tensor,
    image_probabilities: torch.Tensor,
    labels: torch.Tensor,
    classification_temperature: float = 0.07,
) -> torch.Tensor:
    """MRAD-FT: focal + dice on the upsampled (B, 2, S, S) pixel retrieval, plus the image classification loss."""
    segmentation = focal_loss(patch_probability_maps, masks) + binary_dice_loss(patch_probability_maps[:, 1], masks)
    return segmentation + image_classification_loss(image_probabilities, labels, classification_temperature)


def prompt_loss(text_probability_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MRAD-CLIP prompt stage: focal + dice on the anomaly channel + dice of the normal channel against 1 - mask."""
    return (
        focal_loss(text_probability_maps, masks)
        + binary_dice_loss(text_probability_maps[:, 1], masks)
        + binary_dice_loss(text_probability_maps[:, 0], 1.0 - masks)
    )
