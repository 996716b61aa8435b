# SPDX-License-Identifier: Apache-2.0
"""Soft retrieval: hand-computed values, streaming equals dense, error messages."""

import math

import pytest
import torch

from mrad_hf.models.mrad.retrieval_mrad import l2_normalize, one_hot_labels, retrieval_logits, soft_retrieve


def test_soft_retrieve_hand_computed():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    values = one_hot_labels(torch.tensor([0, 1, 1]))
    query = torch.tensor([[1.0, 0.0]])
    weights = torch.tensor([math.e, 1.0, math.exp(-1)])
    expected_anomaly = (weights[1] + weights[2]) / weights.sum()
    probs = soft_retrieve(query, keys, values)
    assert probs[0, 1].item() == pytest.approx(expected_anomaly.item(), abs=1e-6)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    # temperature sharpens towards the nearest key (label normal)
    sharp = soft_retrieve(query, keys, values, temperature=0.01)
    assert sharp[0, 0].item() > 0.999


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_streaming_equals_dense(chunk_size):
    generator = torch.Generator().manual_seed(0)
    queries = l2_normalize(torch.randn(3, 50, 16, generator=generator))
    keys = l2_normalize(torch.randn(333, 16, generator=generator))
    values = one_hot_labels(torch.randint(0, 2, (333,), generator=generator))
    dense = soft_retrieve(queries, keys, values, temperature=0.05)
    streamed = soft_retrieve(queries, keys, values, temperature=0.05, chunk_size=chunk_size)
    torch.testing.assert_close(streamed, dense, atol=1e-6, rtol=1e-5)


def test_logits_and_errors():
    q, k = torch.randn(2, 4), torch.randn(5, 4)
    torch.testing.assert_close(retrieval_logits(q, k, 2.0), q @ k.t() / 2.0)
    with pytest.raises(ValueError, match="empty"):
        soft_retrieve(q, torch.zeros(0, 4), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="5 keys but 3 values"):
        soft_retrieve(q, k, torch.zeros(3, 2))


def test_similarity_dropout_mask_on_hand_made_similarities():
    from mrad_hf.models.mrad.retrieval_mrad import similarity_dropout_mask

    cosine = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    # quantile 0.8 with linear interpolation: sorted [.1 .3 .5 .7 .9], position 3.2 -> 0.74: only 0.9 is dropped
    assert similarity_dropout_mask(cosine, 0.8).tolist() == [[False, True, False, False, False]]
    # quantile 0.5 is exactly 0.5; the rule is strict (>), so 0.5 itself stays
    assert similarity_dropout_mask(cosine, 0.5).tolist() == [[False, True, False, False, True]]
    # per query: each row gets its own threshold
    two = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [0.9, 0.8, 0.7, 0.6, 0.5]])
    assert similarity_dropout_mask(two, 0.8)[1].tolist() == [True, False, False, False, False]


def test_masked_soft_retrieve_ignores_dropped_entries():
    from mrad_hf.models.mrad.retrieval_mrad import masked_soft_retrieve

    logits = torch.tensor([[5.0, 0.0, 0.0]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert masked_soft_retrieve(logits, values)[0, 1] > 0.98
    dropped = masked_soft_retrieve(logits, values, torch.tensor([[True, False, False]]))
    torch.testing.assert_close(dropped, torch.tensor([[1.0, 0.0]]))


def test_region_prior_tokens_means_and_empty_regions():
    from mrad_hf.models.mrad.retrieval_mrad import region_prior_tokens

    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    anomaly = torch.tensor([[0.9, 0.2, 0.5]])  # 0.5 is not > 0.5: normal
    tokens_out = region_prior_tokens(anomaly, tokens, 0.5)
    torch.testing.assert_close(tokens_out, torch.tensor([[[0.5, 1.0], [1.0, 0.0]]]))
    all_normal = region_prior_tokens(torch.zeros(1, 3), tokens, 0.5)
    torch.testing.assert_close(all_normal[0, 1], torch.zeros(2))  # empty anomalous region -> zero token


def test_batch_invariant_retrieval_is_row_by_row_and_equals_the_batched_product():
    from mrad_hf.models.mrad.retrieval_mrad import masked_soft_retrieve

    generator = torch.Generator().manual_seed(5)
    queries = l2_normalize(torch.randn(7, 16, generator=generator))
    keys = l2_normalize(torch.randn(50, 16, generator=generator))
    values = one_hot_labels(torch.randint(0, 2, (50,), generator=generator))
    invariant = soft_retrieve(queries, keys, values, temperature=0.1, batch_invariant=True)
    for index in range(7):  # each row is its own product: the same bits as the row alone
        assert torch.equal(
            invariant[index : index + 1],
            soft_retrieve(queries[index : index + 1], keys, values, temperature=0.1, batch_invariant=True),
        )
    torch.testing.assert_close(soft_retrieve(queries, keys, values, temperature=0.1), invariant, atol=1e-6, rtol=0)
    streamed = soft_retrieve(queries, keys, values, temperature=0.1, chunk_size=16, batch_invariant=True)
    torch.testing.assert_close(streamed, invariant, atol=1e-6, rtol=0)
    logits = retrieval_logits(queries, keys, batch_invariant=True)
    torch.testing.assert_close(retrieval_logits(queries, keys), logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        masked_soft_retrieve(logits, values),
        masked_soft_retrieve(logits, values, batch_invariant=True),
        atol=1e-6,
        rtol=0,
    )
