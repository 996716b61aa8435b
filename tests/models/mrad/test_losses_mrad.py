# SPDX-License-Identifier: Apache-2.0
"""The training losses: known values on tiny hand-made cases, and equality with the reference's loss classes."""

import math

import torch
from reference_mrad import reference_dice_loss, reference_focal_loss

from mrad_hf.models.mrad.losses_mrad import (
    binary_dice_loss,
    focal_loss,
    ft_loss,
    image_classification_loss,
    prompt_loss,
)


def test_focal_loss_known_value():
    # one pixel, p = [0.8, 0.2], target 0: one-hot clamped to [1 - 1e-5, 1e-5]; pt = that . p + 1e-5
    probabilities = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
    pt = (1 - 1e-5) * 0.8 + 1e-5 * 0.2 + 1e-5
    expected = -((1 - pt) ** 2) * math.log(pt)
    assert math.isclose(focal_loss(probabilities, torch.zeros(1, 1, 1)).item(), expected, rel_tol=1e-6)
    # a confident correct pixel costs (almost) nothing, a confident wrong one a lot
    assert focal_loss(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 1, 1)).item() < 1e-9
    assert focal_loss(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.ones(1, 1, 1)).item() > 8.0


def test_dice_loss_known_value():
    probability = torch.tensor([[[0.5, 0.5]]])  # (B=1, H=1, W=2)
    target = torch.tensor([[[1.0, 0.0]]])
    assert math.isclose(
        binary_dice_loss(probability, target).item(), 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1), rel_tol=1e-6
    )
    # mean over images: a perfect image (dice 1) and the case above
    both = binary_dice_loss(torch.cat([target, probability]), torch.cat([target, target]))
    assert math.isclose(both.item(), 1 - (1.0 + 2 / 3) / 2, rel_tol=1e-6)


def test_classification_loss_is_a_softmax_over_probabilities_divided_by_0_07():
    probabilities = torch.tensor([[0.3, 0.7]])
    expected = math.log(1 + math.exp(-(0.7 - 0.3) / 0.07))
    assert math.isclose(
        image_classification_loss(probabilities, torch.tensor([1])).item(), expected, rel_tol=1e-5
    )  # float32


def test_losses_equal_reference_classes():
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(3, 2, 9, 9), dim=1)
    target = (torch.rand(3, 9, 9) > 0.7).float()
    torch.testing.assert_close(
        focal_loss(probabilities, target), reference_focal_loss(probabilities, target), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(
        binary_dice_loss(probabilities[:, 1], target), reference_dice_loss(probabilities[:, 1], target)
    )
    image = torch.softmax(torch.randn(3, 2), dim=1)
    labels = torch.tensor([0, 1, 1])
    expected_ft = (
        reference_focal_loss(probabilities, target)
        + reference_dice_loss(probabilities[:, 1], target)
        + torch.nn.functional.cross_entropy(image / 0.07, labels)
    )
    torch.testing.assert_close(ft_loss(probabilities, target, image, labels), expected_ft, atol=1e-6, rtol=0)
    expected_prompt = (
        reference_focal_loss(probabilities, target)
        + reference_dice_loss(probabilities[:, 1], target)
        + reference_dice_loss(probabilities[:, 0], 1 - target)
    )
    torch.testing.assert_close(prompt_loss(probabilities, target), expected_prompt, atol=1e-6, rtol=0)
