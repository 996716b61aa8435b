# SPDX-License-Identifier: Apache-2.0
"""Property-based tests (hypothesis): preprocessing, mask binarisation, image-level metric invariances, and bank I/O
round trips. Deterministic (`derandomize=True`), no example database. The AUPRO / pixel-metric invariances (monotone
and affine transforms, image order) live with the metrics in tests/evaluation/test_metrics.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mrad_hf import MemoryBank, MRADImageProcessor
from mrad_hf.evaluation.metrics import f1_max, image_ap, image_auroc
from mrad_hf.memory import load_bank, save_bank
from mrad_hf.models.mrad.configuration_mrad import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mrad_hf.models.mrad.image_processing_mrad import load_mask, preprocess_mask
from mrad_hf.models.mrad.retrieval_mrad import one_hot_labels

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SIZE = 28
LOW = [(0.0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
HIGH = [(1.0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]

sides = st.integers(14, 60)


@st.composite
def images(draw):
    """uint8 / uint16 / bool / float-in-[0,1] arrays, (H, W), (H, W, 3), (H, W, 4) or (3, H, W)."""
    height, width = draw(sides), draw(sides)
    layout = draw(st.sampled_from(["hw", "hw3", "hw4", "3hw"]))
    shape = {"hw": (height, width), "hw3": (height, width, 3), "hw4": (height, width, 4), "3hw": (3, height, width)}[
        layout
    ]
    dtype = draw(st.sampled_from(["uint8", "uint16", "bool", "float32"]))
    if dtype == "float32":
        elements = st.floats(0.0, 1.0, width=32)
    elif dtype == "bool":
        elements = st.booleans()
    else:
        elements = st.integers(0, np.iinfo(dtype).max)
    return draw(arrays(np.dtype(dtype), shape, elements=elements))


@SETTINGS
@given(image=images())
def test_preprocessing_output_shape_dtype_and_range(image):
    batch = MRADImageProcessor(image_size=SIZE)(image)
    pixels = batch["pixel_values"]
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    for channel in range(3):  # normalised values of pixels in [0, 1] (bicubic overshoot is clipped by PIL)
        assert LOW[channel] - 1e-5 <= pixels[0, channel].min() and pixels[0, channel].max() <= HIGH[channel] + 1e-5
    height, width = (
        image.shape[1:]
        if image.shape[0] == 3 and image.ndim == 3 and image.shape[-1] not in (3, 4)
        else image.shape[:2]
    )
    assert batch["original_sizes"].tolist() == [[height, width]]


@SETTINGS
@given(image=images())
def test_preprocessing_is_deterministic_and_batch_independent(image):
    processor = MRADImageProcessor(image_size=SIZE)
    alone = processor(image)["pixel_values"]
    together = processor([np.zeros((20, 30, 3), np.uint8), image])["pixel_values"]
    assert torch.equal(alone[0], together[1]) and torch.equal(alone, processor(image)["pixel_values"])


masks_strategy = st.tuples(sides, sides).flatmap(lambda hw: arrays(np.uint8, hw, elements=st.integers(0, 255)))


@SETTINGS
@given(mask=masks_strategy, scale=st.integers(1, 200), size=st.integers(4, 64))
def test_mask_binarisation_invariants(mask, scale, size):
    out = preprocess_mask(mask, size)
    assert out.shape == (size, size) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    # only "> 0" matters: any positive value (or a positive rescaling, or the bool mask) gives the same result
    assert torch.equal(out, preprocess_mask(mask > 0, size))
    assert torch.equal(out, preprocess_mask((mask > 0).astype(np.uint16) * scale, size))
    np.testing.assert_array_equal(load_mask(mask), mask > 0)
    if not mask.any():
        assert out.sum() == 0
    if mask.all():
        assert out.sum() == size * size


@SETTINGS
@given(mask=sides.flatmap(lambda side: arrays(np.uint8, (side, side), elements=st.integers(0, 255))))
def test_mask_at_its_own_size_is_the_binarised_mask(mask):
    np.testing.assert_array_equal(preprocess_mask(mask, mask.shape[0]).numpy().astype(bool), mask > 0)


# ---------------------------------------------------------------- image-level metrics
@st.composite
def labelled_scores(draw):
    """Labels with both classes and integer-valued scores (with ties), so monotone transforms are exact in floats."""
    count = draw(st.integers(2, 40))
    labels = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    assume(any(labels) and not all(labels))
    scores = draw(st.lists(st.integers(0, 1000), min_size=count, max_size=count))
    return np.array(labels), np.array(scores, dtype=np.float64)


MONOTONE = {
    "affine": lambda s: 2.0 * s + 3.0,
    "cube": lambda s: s**3,
    "exp": lambda s: np.exp(s / 100.0),
    "shifted-log": lambda s: np.log1p(s),
}


@SETTINGS
@given(data=labelled_scores(), transform=st.sampled_from(sorted(MONOTONE)), seed=st.integers(0, 2**32 - 1))
def test_image_metrics_invariant_to_monotone_transforms_and_permutations(data, transform, seed):
    labels, scores = data
    transformed = MONOTONE[transform](scores)
    assert len(np.unique(transformed)) == len(np.unique(scores))  # strictly monotone on these values
    order = np.random.default_rng(seed).permutation(len(labels))
    for metric in (image_auroc, image_ap, f1_max):
        expected = metric(labels, scores)
        assert metric(labels, transformed) == pytest.approx(expected, abs=1e-12), metric.__name__
        assert metric(labels[order], scores[order]) == pytest.approx(expected, abs=1e-12), metric.__name__
    assert image_auroc(labels, -scores) == pytest.approx(1.0 - image_auroc(labels, scores), abs=1e-12)
    assert 0.0 <= image_auroc(labels, scores) <= 1.0


# ---------------------------------------------------------------- bank I/O
metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _unit_rows(array: np.ndarray) -> torch.Tensor:
    """Rows scaled to unit L2 length, as bank keys are (all-zero rows become the first basis vector)."""
    rows = torch.from_numpy(array).double()
    norms = rows.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, rows / norms, torch.eye(1, rows.shape[1], dtype=torch.float64)).float()


@st.composite
def banks(draw):
    n_image, n_patch = draw(st.integers(0, 12)), draw(st.integers(0, 20))
    d_image, d_patch = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
    metadata = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=8).filter(
                lambda k: k not in ("counts", "tensors_sha256", "image_ids", "image_sources", "format_version")
            ),
            metadata_values,
            max_size=4,
        )
    )
    image_labels = draw(st.lists(st.integers(0, 1), min_size=n_image, max_size=n_image))
    patch_labels = draw(st.lists(st.integers(0, 1), min_size=n_patch, max_size=n_patch))
    sources = draw(st.lists(st.integers(-1, max(n_image - 1, -1)), min_size=n_patch, max_size=n_patch))
    return MemoryBank(
        image_keys=_unit_rows(draw(arrays(np.float32, (n_image, d_image), elements=finite))),
        image_values=one_hot_labels(torch.tensor(image_labels, dtype=torch.long)).reshape(n_image, 2),
        patch_keys=_unit_rows(draw(arrays(np.float32, (n_patch, d_patch), elements=finite))),
        patch_values=one_hot_labels(torch.tensor(patch_labels, dtype=torch.long)).reshape(n_patch, 2),
        patch_sources=torch.tensor(sources, dtype=torch.long),
        metadata=metadata,
    )


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(bank=banks())
def test_bank_round_trip_is_bit_exact(bank, tmp_path):
    loaded = load_bank(save_bank(bank, tmp_path / "bank.safetensors"))
    for name, tensor in bank.tensors().items():
        again = getattr(loaded, name)
        assert again.dtype == tensor.dtype and again.shape == tensor.shape, name
        # bit patterns, so -0.0 vs 0.0 and every float payload count
        assert torch.equal(
            again.view(torch.int32) if again.is_floating_point() else again,
            tensor.view(torch.int32) if tensor.is_floating_point() else tensor,
        ), name
    assert loaded.metadata == bank.metadata
    assert loaded.counts() == bank.counts()
