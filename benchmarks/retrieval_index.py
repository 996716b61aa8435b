# SPDX-License-Identifier: Apache-2.0
"""APPROXIMATE soft retrieval through a FAISS index, for memory banks too large to scan (paper Sec. 3.3).

MRAD reads its memory by `p = softmax(q K^T / tau) V` over **all** N keys (`mrad_hf.retrieval.soft_retrieve`,
exact, with a chunked path whose memory is bounded by the chunk size). This module replaces that by

    p_hat = softmax(q K_top^T / tau) V_top      over the k keys with the largest inner product q . K

found by a FAISS index (`faiss-cpu`, an optional dependency: `pip install "mrad-hf[faiss]"`). It is an
approximation, never the default, and it is labelled as such everywhere it is used. Two sources of error:

1. **Truncation** (both index types): the softmax mass of the N - k dropped keys is ignored. With one-hot
   (or any [0, 1]) values, `|p - p_hat| <= D / (S + D)` per query, where S is the summed weight of the kept
   keys and D the dropped one. When the index returns the exact top k, every dropped weight is at most the
   k-th kept weight w_k, so D <= (N - k) w_k: `truncation_bound` returns that bound. Sharp softmaxes (small
   tau) make it tiny; with the reference's tau = 1 and cosine logits in [-1, 1] all weights are within a
   factor e^2 of each other, the mass is spread over the whole bank and top-k truncation can move p a lot:
   check the bound before relying on it.
2. **Search** (`index="ivf"` only): an inverted-file index probes `nprobe` of `nlist` clusters, so it may miss
   some of the true top k; the bound above then no longer holds. `index="flat"` searches exhaustively (exact
   top k, memory bounded by FAISS's internal blocking) and `nprobe = nlist` makes IVF exhaustive too.

Keys and queries are expected L2-normalised (as MRAD's are), so inner product = cosine similarity.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FaissRetrievalIndex", "import_faiss", "truncation_bound"]

_INSTALL_HINT = (
    "The FAISS retrieval path needs the optional package faiss-cpu. Install it with "
    '`pip install "mrad-hf[faiss]"` (or `pip install faiss-cpu`), or use the exact retrieval '
    "(`mrad_hf.retrieval.soft_retrieve` with `chunk_size` for large banks), which needs nothing extra."
)


def import_faiss():
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return faiss


def truncation_bound(top_logits: torch.Tensor, num_keys: int, temperature: float = 1.0) -> torch.Tensor:
    """Upper bound on |exact - top-k| retrieval per query, valid when `top_logits` are the exact top k.

    Args:
        top_logits: (M, k) the k largest similarities q . K of each query, in descending order.
        num_keys: N, the size of the whole bank.
    Returns:
        (M,) D_max / (S + D_max), with S = sum of the kept softmax weights and D_max = (N - k) * w_k
        (weights relative to the largest logit, so nothing overflows).
    """
    kept = top_logits.shape[-1]
    scaled = (top_logits - top_logits[..., :1]) / temperature
    weights = torch.exp(scaled)
    dropped = (num_keys - kept) * weights[..., -1]
    return dropped / (weights.sum(dim=-1) + dropped)


class FaissRetrievalIndex:
    """Approximate `softmax(q K^T / tau) V` over the top-k keys of a FAISS inner-product index (see the module doc).

    Args:
        keys: (N, D) memory keys (L2-normalised).
        values: (N, C) memory values (one-hot labels).
        top_k: how many nearest keys enter the softmax (capped at N; k = N with `index="flat"` is exact).
        temperature: tau, as in `soft_retrieve`.
        index: "flat" (exhaustive search, exact top k) or "ivf" (inverted file, approximate search).
        nlist: IVF clusters (default sqrt(N), at least 1 and at most N // 39 so k-means has data); k-means trains on
            at most 64 keys per cluster.
        nprobe: IVF clusters searched per query (default min(nlist, 16)).
        seed: seed of the IVF k-means training.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        top_k: int = 64,
        temperature: float = 1.0,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
    ):
        faiss = import_faiss()
        if keys.ndim != 2 or keys.shape[0] == 0:
            raise ValueError(
                f"keys must be a non-empty (N, D) tensor, got shape {tuple(keys.shape)}: build or load a memory bank first."
            )
        if values.shape[0] != keys.shape[0]:
            raise ValueError(f"Memory has {keys.shape[0]} keys but {values.shape[0]} values.")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.num_keys, self.dim = keys.shape
        self.top_k = min(int(top_k), self.num_keys)
        self.temperature = float(temperature)
        self.values = values.detach().float().cpu()
        matrix = np.ascontiguousarray(keys.detach().float().cpu().numpy())
        if index == "flat":
            self.index = faiss.IndexFlatIP(self.dim)
        elif index == "ivf":
            nlist = nlist or int(math.sqrt(self.num_keys))
            nlist = max(1, min(nlist, self.num_keys // 39))
            quantizer = faiss.IndexFlatIP(self.dim)
            self.index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            rows = np.random.default_rng(seed).permutation(self.num_keys)[: 64 * nlist]  # k-means on a sample
            self.index.train(matrix[np.sort(rows)])
            self.index.nprobe = min(nlist, nprobe or 16)
            self._quantizer = quantizer  # the IVF index does not own it
        else:
            raise ValueError(f"Unknown index {index!r}; use 'flat' (exact top-k) or 'ivf' (approximate search).")
        self.index_type = index
        self.index.add(matrix)

    def __repr__(self) -> str:
        extra = f", nlist={self.index.nlist}, nprobe={self.index.nprobe}" if self.index_type == "ivf" else ""
        return f"FaissRetrievalIndex(APPROXIMATE top-{self.top_k} softmax, {self.num_keys} keys x {self.dim}, index={self.index_type}{extra})"

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (M, k) descending, indices (M, k)) of the k best keys for (M, D) queries."""
        matrix = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"queries must be (M, {self.dim}) to match the index keys, got {tuple(matrix.shape)}.")
        logits, indices = self.index.search(matrix, self.top_k)
        return torch.from_numpy(logits), torch.from_numpy(indices)

    def retrieve(self, queries: torch.Tensor, *, return_bound: bool = False):
        """APPROXIMATE retrieval for (..., D) queries: (..., C) probabilities (and, if asked, the (...,) truncation bound).

        The result is float32 on the queries' device. The bound is meaningful for `index="flat"` (see the module doc).
        """
        leading = queries.shape[:-1]
        logits, indices = self.search(queries.reshape(-1, queries.shape[-1]))
        missing = indices < 0  # IVF can return fewer than k hits
        weights = torch.softmax((logits / self.temperature).masked_fill(missing, float("-inf")), dim=-1)
        retrieved = torch.einsum("mk,mkc->mc", weights, self.values[indices.clamp_min(0)])
        retrieved = retrieved.reshape(*leading, -1).to(queries.device)
        if not return_bound:
            return retrieved
        bound = truncation_bound(logits, self.num_keys, self.temperature)
        bound = bound.masked_fill(missing.any(dim=-1), 1.0)  # fewer than k hits: nothing can be bounded
        return retrieved, bound.reshape(leading).to(queries.device)
