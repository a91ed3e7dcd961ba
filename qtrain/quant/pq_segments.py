"""Product quantization with one sub-codebook per column segment (Gong, Liu, Yang & Bourdev
2014, "Compressing Deep Convolutional Networks using Vector Quantization", sec. 3.3).

The weight W (m, n) -- a conv's reshaped to (out, in * kh * kw) -- is split column-wise into
S = n / d segments W = [W^1, ..., W^S], W^s (m, d) with d = ``block_size``; k-means is run
on the m rows of each segment separately, so segment s has its own codebook C^s (K, d) and
each row keeps one index per segment: ``W_hat[r, s*d:(s+1)*d] = C^s[a[r, s]]``.
Storage (the paper's count, with fp16 centroids here): ``m * S * ceil(log2 K)`` index bits
+ ``16 * S * K * d`` codebook bits. K <= m (each segment has m sub-vectors).

Layout used by :mod:`qtrain.nn.pq_layers`: ``centroids`` (S, K, d), ``assignments`` (m * S,)
row-major (row r, segment s at ``r * S + s``).
"""

from __future__ import annotations

import math

import torch

from qtrain.quant import kmeans as KM


def segments_of(weight: torch.Tensor, block_size: int, name: str = "weight") -> torch.Tensor:
    """(S, m, d): segment s holds the m sub-vectors of columns [s*d, (s+1)*d)."""
    x = KM.blocks_of(weight, block_size, name)  # (m * S, d), row-major
    m = weight.shape[0]
    return x.reshape(m, -1, block_size).transpose(0, 1)


def pq_fit_segments(weight: torch.Tensor, block_size: int, n_centroids: int = 256,
                    n_iter: int = 20, seed: int = 0, name: str = "weight"):
    """One k-means codebook per column segment (segment s seeded ``seed + s``).

    Returns (centroids (S, K, d), assignments (m * S,) long, row-major)."""
    segs = segments_of(weight.detach(), block_size, name)
    books, codes = [], []
    for s in range(segs.shape[0]):
        r = KM.kmeans(segs[s], n_centroids, n_iter, seed + s, name=f"{name}[segment {s}]")
        books.append(r.centroids)
        codes.append(r.assignments)
    return torch.stack(books), torch.stack(codes, dim=1).reshape(-1)


def flat_index(assignments: torch.Tensor, n_segments: int, n_centroids: int) -> torch.Tensor:
    """Index into ``centroids.reshape(S * K, d)`` of row-major per-segment assignments."""
    seg = torch.arange(assignments.numel(), device=assignments.device) % n_segments
    return assignments.reshape(-1) + n_centroids * seg


def reconstruct(centroids: torch.Tensor, assignments: torch.Tensor, shape) -> torch.Tensor:
    """The weight of ``shape`` from its per-segment codebooks: ``C^s[a[r, s]]``."""
    s, k, d = centroids.shape
    return centroids.reshape(s * k, d)[flat_index(assignments, s, k)].reshape(shape)


def storage_bits(n_blocks: int, n_segments: int, n_centroids: int, block_size: int) -> int:
    """ceil(log2 K) bits per index + S codebooks of K * d fp16 centroids."""
    return (n_blocks * max(1, math.ceil(math.log2(n_centroids)))
            + 16 * n_segments * n_centroids * block_size)
