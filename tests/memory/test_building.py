# SPDX-License-Identifier: Apache-2.0
"""Bank building helpers (mrad_hf.memory.building)."""

import pytest
import torch

from mrad_hf.memory.building import patch_region_labels


def test_patch_region_labels_exact_rule_drops_boundaries():
    masks = torch.zeros(1, 56, 56)
    masks[0, 0:28, 0:28] = 1  # exactly the top-left 2 x 2 patches of a 4 x 4 grid
    masks[0, 40:42, 40:56] = 1  # a stripe between the bilinear sample rows of its patches: they stay normal
    labels = patch_region_labels(masks, 4, "exact").view(4, 4)
    assert labels[0, 0] == 1 and labels[1, 1] == 1
    assert labels[3, 3] == 0
    # a one-pixel-wide stripe at row 48 (centre rows of patch row 3 are 48 and 49): value 0.5, dropped
    masks2 = torch.zeros(1, 56, 56)
    masks2[0, 48, :] = 1
    labels2 = patch_region_labels(masks2, 4, "exact").view(4, 4)
    assert (labels2[3] == -1).all() and (labels2[:3] == 0).all()
    assert (patch_region_labels(masks2, 4, "majority").view(4, 4) == 0).all()
    with pytest.raises(ValueError, match="Unknown region rule"):
        patch_region_labels(masks, 4, "any")
