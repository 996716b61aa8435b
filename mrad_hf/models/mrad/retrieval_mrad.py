# SPDX-License-Identifier: Apache-2.0
"""Retrieval against MRAD's memory banks: pure tensor functions (paper Sec. 3.2-3.5).

A query q reads a key/value memory (K, V) by soft attention, p = softmax(q K^T / tau) V. With L2-normalised queries
and keys and tau = 1 (the reference) the logits are cosines; the values are one-hot labels (column 0 normal, 1
anomaly), so p holds the two states' probabilities. `soft_retrieve` can stream over a bank of millions of keys in
chunks with an online softmax (exact, memory bounded by the chunk). MRAD-FT (Sec. 3.4) reads the memory through
learned projections and, while training, masks the entries most similar to the query in the unprojected space
(similarity dropout), so that an image cannot retrieve itself. MRAD-CLIP (Sec. 3.5) summarises the pixel retrieval
as two region priors. `batch_invariant=True` makes every 2-D product one product per row: CPU GEMM libraries pick
kernels by the row count, so a batched product can differ in the last bit from the same row alone.
"""

from __future__ import annotations

import torch

__all__ = [
    "rowwise_matmul",
    "rowwise_linear",
    "l2_normalize",
    "retrieval_logits",
    "soft_retrieve",
    "one_hot_labels",
    "similarity_dropout_mask",
    "masked_soft_retrieve",
    "region_prior_tokens",
]


def rowwise_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, one product per row for a 2-D `a` (one row per image), so that a row's result does not depend on the
    others (docs/reliability.md, "Determinism"); a 3-D `a` (patches per image) has a fixed row count: plain matmul."""
    if a.ndim != 2:
        return torch.matmul(a, b)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(0).expand(a.shape[0], -1, -1)).squeeze(1)


def rowwise_linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`, where for a 2-D `x` (one row per image) every row is its own product (see `rowwise_matmul`)."""
    if x.ndim != 2:
        return linear(x)
    out = rowwise_matmul(x, linear.weight.t())
    return out if linear.bias is None else out + linear.bias


def _matmul(a: torch.Tensor, b: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    return rowwise_matmul(a, b) if batch_invariant else torch.matmul(a, b)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last axis, as the reference does (no epsilon; a zero vector stays NaN-free only if non-zero)."""
    return x / x.norm(dim=-1, keepdim=True)


def one_hot_labels(labels: torch.Tensor, num_states: int = 2) -> torch.Tensor:
    """Integer labels (0 = normal, 1 = anomaly) to float one-hot memory values, shape (N, num_states)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes=num_states).float()


def retrieval_logits(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0, *, batch_invariant: bool = False
) -> torch.Tensor:
    """Similarity logits q K^T / tau: queries (..., D), keys (N, D) -> (..., N)."""
    logits = _matmul(queries, keys.transpose(0, 1), batch_invariant)
    return logits if temperature == 1.0 else logits / temperature


def soft_retrieve(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """softmax(q K^T / tau) V: queries (..., D), keys (N, D), values (N, C) -> (..., C) (probabilities for one-hot
    values). `chunk_size` < N streams over the keys with an online softmax: peak memory O(queries x chunk_size)."""
    if keys.shape[0] == 0:
        raise ValueError("The memory bank is empty: build or load a memory bank before retrieval.")
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"Memory has {keys.shape[0]} keys but {values.shape[0]} values.")
    values = values.to(queries.dtype)
    keys = keys.to(queries.dtype)
    if chunk_size is None or chunk_size >= keys.shape[0]:
        weights = torch.softmax(retrieval_logits(queries, keys, temperature, batch_invariant=batch_invariant), dim=-1)
        return _matmul(weights, values, batch_invariant)

    maximum = queries.new_full((*queries.shape[:-1], 1), float("-inf"))
    total = accumulated = 0.0
    for start in range(0, keys.shape[0], chunk_size):
        logits = retrieval_logits(
            queries, keys[start : start + chunk_size], temperature, batch_invariant=batch_invariant
        )
        new_maximum = torch.maximum(maximum, logits.amax(dim=-1, keepdim=True))
        rescale, weights = torch.exp(maximum - new_maximum), torch.exp(logits - new_maximum)
        total = total * rescale + weights.sum(dim=-1, keepdim=True)
        accumulated = accumulated * rescale + _matmul(weights, values[start : start + chunk_size], batch_invariant)
        maximum = new_maximum
    return accumulated / total


def similarity_dropout_mask(original_similarity: torch.Tensor, quantile: float) -> torch.Tensor:
    """(..., N) bool: True (drop) where the *unprojected* cosine is strictly above its per-query quantile (0.95 image,
    0.8 pixel level; `torch.quantile`, linear interpolation, as the reference)."""
    threshold = torch.quantile(original_similarity, quantile, dim=-1, keepdim=True)
    return original_similarity > threshold


def masked_soft_retrieve(
    logits: torch.Tensor, values: torch.Tensor, drop_mask: torch.Tensor | None = None, *, batch_invariant: bool = False
) -> torch.Tensor:
    """softmax(logits with dropped entries at -inf) V. logits (..., N), values (N, C), drop_mask (..., N) bool."""
    if drop_mask is not None:
        logits = logits.masked_fill(drop_mask, float("-inf"))
    return _matmul(torch.softmax(logits, dim=-1), values.to(logits.dtype), batch_invariant)


def region_prior_tokens(
    anomaly_probability: torch.Tensor, tokens: torch.Tensor, threshold: float = 0.5
) -> torch.Tensor:
    """MRAD-CLIP's region priors: (B, 2, D) [mean normal token, mean anomalous token] of (B, L, D) patch tokens, a
    patch being anomalous where its (B, L) pixel-retrieval p_anomaly > threshold; an empty region gives zeros."""
    anomalous = (anomaly_probability > threshold).to(tokens.dtype).unsqueeze(-1)
    normal = 1.0 - anomalous
    summaries = []
    for region in (normal, anomalous):
        count = region.sum(dim=1)
        mean = (tokens * region).sum(dim=1) / count.clamp(min=1.0)
        summaries.append(torch.where(count > 0, mean, torch.zeros_like(mean)))
    return torch.stack(summaries, dim=1)
