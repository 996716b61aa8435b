# SPDX-License-Identifier: Apache-2.0
"""Retrieval against MRAD's memory banks: pure tensor functions (paper Sec. 3.2-3.3).

A query q reads a key/value memory (K, V) by soft attention:

    p = softmax(q K^T / tau) V

With L2-normalised queries and keys and tau = 1 (the reference), the logits are cosine similarities.
The values are one-hot labels (column 0 = normal, column 1 = anomaly), so p is a probability of each
state. The same functions serve the image level (class-token keys) and the pixel level (region
prototypes), the model, the trainer and the tests.

`soft_retrieve` can stream over the bank in chunks with an online softmax (running max and sum), which
gives the same result as the dense form with memory bounded by the chunk size, for banks of millions
of keys.

MRAD-FT (Sec. 3.4) reads the same memory through learned query/key projections; while training, the
*similarity dropout* masks the entries most similar to the query in the original (unprojected) cosine
space, so that an image cannot simply retrieve itself from a memory built from the training images
(`similarity_dropout_mask`, `masked_soft_retrieve`). MRAD-CLIP (Sec. 3.5) summarises the pixel-level
retrieval as two region priors (`region_prior_tokens`).
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
    """a @ b, where for a 2-D `a` (one row per image) every row is its own product.

    CPU GEMM libraries pick kernels by the number of rows (a single row is a GEMV), so a plain `a @ b` over a batch
    can differ in the last bit from the same row alone. One product per row makes an image's result independent of
    the batch it is scored in (see docs/reliability.md, "Determinism"); for 3-D `a` (many patches per image) the row
    count does not depend on the batch composition and a plain matmul is used.
    """
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
    """Similarity logits q K^T / tau. queries (..., D), keys (N, D) -> (..., N).

    `batch_invariant`: one product per query row for 2-D queries (`rowwise_matmul`), so that a row's logits do not
    depend on the other rows; otherwise one GEMM (equal within float rounding)."""
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
    """Soft retrieval softmax(q K^T / tau) V.

    Args:
        queries: (..., D) query vectors (normalised by the caller where the method says so).
        keys: (N, D) memory keys.
        values: (N, C) memory values (one-hot labels).
        temperature: tau.
        chunk_size: if set and smaller than N, stream over the keys in chunks of this size with an online
            softmax; exact up to float rounding, with peak memory O(queries x chunk_size).
        batch_invariant: per-row products for 2-D queries (see `retrieval_logits`).

    Returns:
        (..., C) retrieved values; for one-hot values, state probabilities that sum to 1.
    """
    if keys.shape[0] == 0:
        raise ValueError("The memory bank is empty: build or load a memory bank before retrieval.")
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"Memory has {keys.shape[0]} keys but {values.shape[0]} values.")
    values = values.to(queries.dtype)
    keys = keys.to(queries.dtype)
    if chunk_size is None or chunk_size >= keys.shape[0]:
        weights = torch.softmax(retrieval_logits(queries, keys, temperature, batch_invariant=batch_invariant), dim=-1)
        return _matmul(weights, values, batch_invariant)

    running_max = None
    running_sum = None
    accumulated = None
    for start in range(0, keys.shape[0], chunk_size):
        logits = retrieval_logits(
            queries, keys[start : start + chunk_size], temperature, batch_invariant=batch_invariant
        )
        chunk_max = logits.amax(dim=-1, keepdim=True)
        if running_max is None:
            new_max = chunk_max
            exp_logits = torch.exp(logits - new_max)
            running_sum = exp_logits.sum(dim=-1, keepdim=True)
            accumulated = _matmul(exp_logits, values[start : start + chunk_size], batch_invariant)
        else:
            new_max = torch.maximum(running_max, chunk_max)
            rescale = torch.exp(running_max - new_max)
            exp_logits = torch.exp(logits - new_max)
            running_sum = running_sum * rescale + exp_logits.sum(dim=-1, keepdim=True)
            accumulated = accumulated * rescale + _matmul(
                exp_logits, values[start : start + chunk_size], batch_invariant
            )
        running_max = new_max
    return accumulated / running_sum


def similarity_dropout_mask(original_similarity: torch.Tensor, quantile: float) -> torch.Tensor:
    """Entries to drop while training MRAD-FT: those above the per-query quantile of the original similarity.

    Args:
        original_similarity: (..., N) cosine similarities of each query with every key, *before* projection.
        quantile: e.g. 0.95 (image level) or 0.8 (pixel level); `torch.quantile` with linear interpolation,
            as the reference computes it.

    Returns:
        (..., N) bool, True where `similarity > threshold` (strictly), i.e. the entries to mask out.
    """
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
    """MRAD-CLIP's region priors: mean token over the normal and over the anomalous patches of each image.

    Args:
        anomaly_probability: (B, L) pixel-level retrieval p_anomaly per patch.
        tokens: (B, L, D) patch tokens to average (the reference: normalised, neighbour-averaged, projected).
        threshold: a patch is anomalous when p_anomaly > threshold (strict), normal otherwise.

    Returns:
        (B, 2, D): [normal token, anomalous token]; a region with no patch gives the zero vector.
    """
    anomalous = (anomaly_probability > threshold).to(tokens.dtype).unsqueeze(-1)
    normal = 1.0 - anomalous
    summaries = []
    for region in (normal, anomalous):
        count = region.sum(dim=1)
        mean = (tokens * region).sum(dim=1) / count.clamp(min=1.0)
        summaries.append(torch.where(count > 0, mean, torch.zeros_like(mean)))
    return torch.stack(summaries, dim=1)
