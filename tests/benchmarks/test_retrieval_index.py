# SPDX-License-Identifier: Apache-2.0
"""The approximate FAISS retrieval path agrees with the exact soft retrieval as far as its stated bound says."""

import sys
from pathlib import Path

import pytest
import torch

from mrad_hf.models.mrad.retrieval_mrad import l2_normalize, one_hot_labels, soft_retrieve

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from retrieval_index import import_faiss, truncation_bound  # noqa: E402


def _bank(num_keys=600, dim=32, num_queries=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = l2_normalize(torch.randn(num_keys, dim, generator=generator))
    values = one_hot_labels(torch.randint(0, 2, (num_keys,), generator=generator))
    # queries near some keys, so that the top-k softmax is meaningful
    queries = l2_normalize(keys[:num_queries] + 0.3 * torch.randn(num_queries, dim, generator=generator))
    return queries, keys, values


def test_missing_faiss_gives_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install \"mrad-hf\[faiss\]\""):
        import_faiss()


def test_truncation_bound_hand_computed():
    logits = torch.tensor([[1.0, 0.0]])  # top 2 of N = 4 keys, tau = 1: weights 1, e^-1; dropped <= 2 e^-1
    dropped = 2 * torch.exp(torch.tensor(-1.0))
    expected = dropped / (1 + torch.exp(torch.tensor(-1.0)) + dropped)
    torch.testing.assert_close(truncation_bound(logits, 4), expected.reshape(1))
    assert truncation_bound(logits, 2).item() == 0.0  # nothing dropped


def test_faiss_flat_agrees_with_exact_retrieval():
    pytest.importorskip("faiss")
    from retrieval_index import FaissRetrievalIndex

    queries, keys, values = _bank()
    # k = N: no truncation, the flat index is exact
    full = FaissRetrievalIndex(keys, values, top_k=keys.shape[0], temperature=1.0)
    torch.testing.assert_close(full.retrieve(queries), soft_retrieve(queries, keys, values), atol=1e-5, rtol=0)
    # k < N at a sharp temperature: within the truncation bound of the exact result, and close
    exact = soft_retrieve(queries, keys, values, temperature=0.01)
    index = FaissRetrievalIndex(keys, values, top_k=32, temperature=0.01)
    approx, bound = index.retrieve(queries.view(4, 10, -1), return_bound=True)
    error = (approx.view(40, 2) - exact).abs().amax(dim=-1)
    assert bound.shape == (4, 10)
    assert torch.all(error <= bound.view(40) + 1e-5)
    assert error.max() < 1e-5 and bound.max() < 1e-3
    torch.testing.assert_close(approx.sum(-1), torch.ones(4, 10))
    # at the reference's tau = 1 the softmax is spread over the whole bank: the bound says top-32 is not enough
    _, loose = FaissRetrievalIndex(keys, values, top_k=32).retrieve(queries, return_bound=True)
    assert loose.min() > 0.5
    assert "APPROXIMATE" in repr(index)


def test_faiss_ivf_with_all_lists_probed_equals_flat_top_k():
    pytest.importorskip("faiss")
    from retrieval_index import FaissRetrievalIndex

    queries, keys, values = _bank(num_keys=2000)
    flat = FaissRetrievalIndex(keys, values, top_k=16, temperature=0.05)
    ivf = FaissRetrievalIndex(keys, values, top_k=16, temperature=0.05, index="ivf", nlist=20, nprobe=20)
    torch.testing.assert_close(ivf.retrieve(queries), flat.retrieve(queries), atol=1e-6, rtol=0)
    # with one list probed the search is approximate but still returns k hits per query here
    approximate = FaissRetrievalIndex(keys, values, top_k=16, temperature=0.05, index="ivf", nlist=20, nprobe=1)
    assert approximate.retrieve(queries).shape == (40, 2)


def test_faiss_index_rejects_bad_input():
    pytest.importorskip("faiss")
    from retrieval_index import FaissRetrievalIndex

    queries, keys, values = _bank(num_keys=50)
    with pytest.raises(ValueError, match="non-empty"):
        FaissRetrievalIndex(torch.zeros(0, 32), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="50 keys but 3 values"):
        FaissRetrievalIndex(keys, values[:3])
    with pytest.raises(ValueError, match="Unknown index"):
        FaissRetrievalIndex(keys, values, index="hnsw")
    with pytest.raises(ValueError, match=r"\(M, 32\)"):
        FaissRetrievalIndex(keys, values).retrieve(torch.zeros(2, 16))
