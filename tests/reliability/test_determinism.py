# SPDX-License-Identifier: Apache-2.0
"""Determinism on CPU: the same inputs and weights give bit-identical maps and scores.

Across repeated runs, the order of the images in a batch, the other images of a batch, the batch size (an image
scored alone or inside a batch), and a reload through `from_pretrained` (which re-aligns memory-mapped weights),
for MRAD-TF, MRAD-FT and MRAD-CLIP, with `config.batch_invariant=True` (the guarantee that switch gives; the
default whole-batch path agrees within 1e-5, tests/models/mrad/test_features_mrad.py). docs/reliability.md ("Determinism") explains the per-image products that make
small-M CPU kernels (GEMM with M = batch size, one-row batched matmuls, a batch-1 convolution, strided views) batch
invariant.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_samples, make_tiny_model

from mrad_hf import MRADForAnomalyDetection, MRADImageProcessor
from mrad_hf.memory import build_memory_bank


@pytest.fixture(scope="module")
def scored():
    model = make_tiny_model(batch_invariant=True)
    build_memory_bank(model, make_samples(8), batch_size=4, progress=False)
    pixels = MRADImageProcessor.from_config(model.config)([s["image"] for s in make_samples(6, seed=9)])[
        "pixel_values"
    ]
    with torch.no_grad():
        reference = model(pixel_values=pixels[:4])
    return model, pixels, reference


def _same(outputs, reference, index) -> bool:
    return torch.equal(outputs.anomaly_map, reference.anomaly_map[index]) and torch.equal(
        outputs.anomaly_score, reference.anomaly_score[index]
    )


@torch.no_grad()
def test_repeated_runs_are_bit_identical(scored):
    model, pixels, reference = scored
    for _ in range(3):
        assert _same(model(pixel_values=pixels[:4]), reference, slice(0, 4))


@torch.no_grad()
def test_a_reloaded_model_is_bit_identical(scored, tmp_path):
    """from_pretrained maps safetensors: weights land at 4-byte offsets, and MKL's GEMM rounds differently on
    misaligned data (last bits only); from_pretrained copies them into aligned memory, so the reload is bit-identical."""
    model, pixels, reference = scored
    model.save_pretrained(tmp_path)
    reloaded = MRADForAnomalyDetection.from_pretrained(tmp_path)
    assert all(tensor.data_ptr() % 64 == 0 for tensor in reloaded.parameters())
    assert _same(reloaded(pixel_values=pixels[:4]), reference, slice(0, 4))


@torch.no_grad()
def test_batch_order_and_other_batch_members_do_not_change_an_image(scored):
    model, pixels, reference = scored
    order = [3, 1, 0, 2]
    assert _same(model(pixel_values=pixels[order]), reference, order)
    mixed = model(pixel_values=torch.stack([pixels[0], pixels[5], pixels[4], pixels[2]]))  # same size, other members
    assert torch.equal(mixed.anomaly_score[[0, 3]], reference.anomaly_score[[0, 2]])
    assert torch.equal(mixed.anomaly_map[[0, 3]], reference.anomaly_map[[0, 2]])


@torch.no_grad()
def test_image_alone_is_close_to_the_same_image_in_a_batch(scored):
    model, pixels, reference = scored
    for index in range(4):
        alone = model(pixel_values=pixels[index : index + 1])
        torch.testing.assert_close(alone.anomaly_score, reference.anomaly_score[index : index + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(alone.anomaly_map, reference.anomaly_map[index : index + 1], atol=1e-6, rtol=0)


@torch.no_grad()
def test_image_alone_is_bit_identical_to_the_same_image_in_a_batch(scored):
    model, pixels, reference = scored
    for size in (1, 2, 3):
        for start in range(0, 4 - size + 1):
            assert _same(model(pixel_values=pixels[start : start + size]), reference, slice(start, start + size))


@pytest.mark.parametrize("variant", ["ft", "clip"])
@torch.no_grad()
def test_trained_variants_are_batch_invariant_bit_for_bit(variant):
    from conftest import make_tiny_trained_model

    model = make_tiny_trained_model(variant, batch_invariant=True)
    build_memory_bank(model, make_samples(6), batch_size=4, progress=False)
    pixels = MRADImageProcessor.from_config(model.config)([s["image"] for s in make_samples(4, seed=3)])[
        "pixel_values"
    ]
    full = model(pixel_values=pixels)
    for size in (1, 3):
        for start in range(0, 4 - size + 1):
            assert _same(model(pixel_values=pixels[start : start + size]), full, slice(start, start + size)), (
                variant,
                size,
                start,
            )
