# SPDX-License-Identifier: Apache-2.0
"""Post-processing equals the reference's scipy/torch steps."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from mrad_hf.models.mrad.postprocessing_mrad import (
    fuse_image_score,
    gaussian_blur,
    gaussian_kernel1d,
    top_k_mean,
    upsample_patch_probabilities,
)


@pytest.mark.parametrize("shape", [(2, 518, 518), (1, 9, 13), (3, 40, 40)])
def test_gaussian_blur_equals_scipy(shape):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), expected, atol=1e-6)
    # the reference passes a (1, H, W) array, smoothing a singleton axis too: still the same
    np.testing.assert_allclose(
        gaussian_blur(maps[:1], 4.0).numpy(), gaussian_filter(maps[:1].numpy(), sigma=4), atol=1e-6
    )


def test_gaussian_kernel_matches_scipy_radius():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33  # radius int(4 * 4 + 0.5) = 16
    assert kernel.sum().item() == pytest.approx(1.0)
    assert gaussian_blur(torch.ones(1, 5, 5), 0) is not None


def test_upsample_matches_interpolate_on_both_channels():
    probs = torch.rand(2, 16, 2)
    up = upsample_patch_probabilities(probs, 4, 32)
    grid = probs.reshape(2, 4, 4, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(up, torch.nn.functional.interpolate(grid, 32, mode="bilinear"))


def test_top_k_mean_and_fusion_hand_computed():
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :3] = torch.tensor([1.0, 0.5, 0.25])
    assert top_k_mean(maps, 0.01).item() == pytest.approx(1.0)  # int(100 * 0.01) = 1 pixel
    assert top_k_mean(maps, 0.03).item() == pytest.approx(1.75 / 3)
    p = torch.tensor([0.2])
    assert fuse_image_score(maps, p, weight=0.7, top_k_ratio=0.03).item() == pytest.approx(0.3 * 1.75 / 3 + 0.7 * 0.2)
    assert fuse_image_score(maps, p, top_k_ratio=0.03, fusion="sum").item() == pytest.approx(1.75 / 3 + 0.2)
    with pytest.raises(ValueError, match="Unknown score fusion"):
        fuse_image_score(maps, p, fusion="max")


@pytest.mark.parametrize(("sigma", "truncate"), [(4.0, 4.0), (2.5, 3.0), (1.0, 4.0), (6.0, 2.0)])
def test_gaussian_blur_equals_scipy_for_other_sigmas_and_truncations(sigma, truncate):
    """The reference's gaussian_filter (mode "reflect") within 1e-5, on maps smaller than the kernel radius too."""
    generator = torch.Generator().manual_seed(1)
    for shape in [(2, 37, 29), (1, 5, 70)]:
        maps = torch.rand(shape, generator=generator) ** 3  # peaky, like anomaly maps
        expected = np.stack([gaussian_filter(m, sigma=sigma, truncate=truncate) for m in maps.numpy()])
        np.testing.assert_allclose(gaussian_blur(maps, sigma, truncate).numpy(), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(gaussian_blur(maps.double(), sigma, truncate).numpy(), expected, atol=1e-5, rtol=0)


def test_batched_blur_equals_image_by_image_blur():
    """batch_invariant=True blurs image by image (bit-identical to each map alone); the default is one batched
    convolution, equal within float rounding."""
    maps = torch.rand(5, 40, 33, generator=torch.Generator().manual_seed(3))
    invariant = gaussian_blur(maps, 4.0, batch_invariant=True)
    for index in range(5):
        assert torch.equal(invariant[index : index + 1], gaussian_blur(maps[index : index + 1], 4.0))
    torch.testing.assert_close(gaussian_blur(maps, 4.0), invariant, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        gaussian_blur(maps, 4.0).numpy(), gaussian_filter(maps.numpy(), sigma=(0, 4, 4)), atol=1e-6
    )
