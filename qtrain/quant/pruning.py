"""Deep Compression math: magnitude pruning, weight sharing on a sparse layer, relative-index
encoding with filler zeros, and the per-layer size of every stage.

Han, Mao & Dally 2016, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding" (ICLR; arXiv 1510.00149):

* Pruning (sec. 2): the smallest-magnitude weights of a layer are removed and the network
  is retrained with them held at 0. :func:`magnitude_mask` keeps exactly
  ``n - round(s * n)`` weights of a layer of ``n`` for a target sparsity ``s``.
  Simplification: the paper prunes below a threshold (a quality parameter times the layer's
  weight std); we prune to an exact per-layer sparsity (the "level pruner" of Distiller),
  which is what the paper reports per layer (its Tables 2-5, "weights %").
  Ties: weights are ranked by ``|w|`` with a stable sort over the row-major flat index, so
  among equal magnitudes the lower flat index is pruned first; already-pruned weights
  (``prev_mask``) rank below every surviving weight, so masks only shrink.
* Relative indices (sec. 2, Fig. 2): the sparse layer stores, per non-zero, the index
  difference to the previous stored entry in ``b`` bits (paper: 8 bits conv, 5 bits fc).
  We store ``z = p - prev - 1`` (the number of zeros skipped, 0 .. 2^b - 1; ``prev`` = -1
  before the first entry), i.e. a difference ``d = z + 1`` of 1 .. 2^b, so 2^b is the largest
  difference, as the paper's "8, the largest 3-bit (as an example) unsigned number". A gap
  with ``d > 2^b`` inserts filler zeros at ``prev + 2^b`` (stored with ``z = 2^b - 1``)
  until it fits: ``floor(z / 2^b)`` fillers. Fig. 2's example (3 bits, non-zeros at 1, 4,
  15) gives one filler at 12. Simplification: the whole layer is one row-major stream
  (no per-row restart, no CSR row pointers counted); trailing zeros need no entry.
* Weight sharing (sec. 3): each stored entry holds a ``code_bits``-bit code. Our choice
  (the paper does not say how a filler's zero is coded when all 2^b codes are centroids):
  a ``b``-bit layer fits K = 2^b - 1 fp32 centroids (codes 0 .. K - 1) and reserves the
  last code, K = 2^b - 1, for filler zeros, so a decoder tells fillers from real entries
  exactly (a real entry may also have ``z = 2^b - 1``). In general the filler code is K and
  ``code_bits = ceil(log2(K + 1))`` (:func:`code_bits_for`; a layer with fewer surviving
  weights than 2^b - 1 gets K = their number). Decoding: positions ``cumsum(z + 1) - 1``,
  entries with code K dropped (:mod:`qtrain.nn.packed_sparse`). The Huffman weight stream
  codes the filler as that same symbol K.
  Centroid fine-tuning (eq. (3), Fig. 3): ``dL/dC_k = sum_{i: code_i = k} dL/dW_i``
  over the surviving weights (:func:`centroid_grad`).
* Huffman (sec. 4): the weight-code stream and the relative-index stream of each layer are
  Huffman-coded separately (:func:`qtrain.quant.size.huffman_bits`); the code tables are
  not counted (as in :mod:`qtrain.quant.size`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.quant.size import huffman_bits


def _check_sparsity(sparsity: float, name: str) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"{name}: sparsity={sparsity!r}; allowed 0 <= sparsity < 1")
    return s


def n_pruned(numel: int, sparsity: float) -> int:
    """Number of weights removed at ``sparsity``: ``round(s * n)`` (half up), at most n - 1
    (one weight of a layer always survives)."""
    return min(numel - 1, int(math.floor(sparsity * numel + 0.5))) if numel else 0


def magnitude_mask(weight: torch.Tensor, sparsity: float, prev_mask: torch.Tensor | None = None,
                   name: str = "weight") -> torch.Tensor:
    """Boolean keep-mask of ``weight``'s shape: the ``n - round(s n)`` largest ``|w|`` survive.

    ``prev_mask``: an earlier (lower-sparsity) mask; its pruned weights are pruned first, so
    the new mask is a subset of it. Ties: module docstring.
    """
    s = _check_sparsity(sparsity, name)
    score = weight.detach().abs().flatten().float()
    if prev_mask is not None:
        if prev_mask.shape != weight.shape:
            raise ValueError(f"{name}: prev_mask shape {tuple(prev_mask.shape)} != weight shape "
                             f"{tuple(weight.shape)}")
        score = torch.where(prev_mask.flatten(), score, torch.full_like(score, -1.0))
    k = n_pruned(score.numel(), s)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep[torch.argsort(score, stable=True)[:k]] = False
    return keep.reshape(weight.shape)


def sparsity_ramp(target: float, n_steps: int) -> list[float]:
    """Gradual pruning: step i of n prunes to ``target * (i + 1) / n`` (linear ramp)."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ConfigError(f"n_steps={n_steps!r}: need a positive int (number of prune epochs)")
    return [target * (i + 1) / n_steps for i in range(n_steps)]


# ---------------------------------------------------------------------------------------
# weight sharing on a sparse layer
# ---------------------------------------------------------------------------------------

def shared_weight(centroids: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W = C[codes]`` where ``mask``, exactly 0 elsewhere (codes of pruned weights ignored)."""
    vals = centroids[codes.clamp(0, centroids.numel() - 1)]
    return torch.where(mask, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


def centroid_grad(grad: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Paper eq. (3): ``dL/dC_k = sum of dL/dW_i over the surviving weights with code k``."""
    g = grad.detach().flatten().float()[mask.flatten()]
    out = torch.zeros(k, dtype=torch.float32, device=grad.device)
    return out.index_add_(0, codes.flatten()[mask.flatten()], g)


def cluster_means(weight: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor,
                  old: torch.Tensor) -> torch.Tensor:
    """Mean surviving weight per code (``old[k]`` for a code with no surviving weight)."""
    k = old.numel()
    c = codes.flatten()[mask.flatten()]
    sums = torch.zeros(k, dtype=torch.float64, device=weight.device).index_add_(
        0, c, weight.detach().flatten()[mask.flatten()].double())
    cnt = torch.bincount(c, minlength=k).double()
    return torch.where(cnt > 0, sums / cnt.clamp_min(1), old.double()).to(old.dtype)


# ---------------------------------------------------------------------------------------
# relative indices and sizes
# ---------------------------------------------------------------------------------------

def relative_index_stream(mask: torch.Tensor, index_bits: int, name: str = "weight"):
    """Stored entries of a sparse layer in relative-index form (module docstring, Fig. 2).

    Returns ``(gaps, is_filler, source)``: per stored entry (fillers included, in order) its
    stored index value ``z`` (0 .. 2^b - 1), whether it is a filler zero, and the flat
    position of the non-zero it precedes or is (fillers: the next non-zero's position).
    """
    if not isinstance(index_bits, int) or not 1 <= index_bits <= 32:
        raise ConfigError(f"{name}: index_bits={index_bits!r}; allowed 1..32")
    span = 1 << index_bits
    pos = mask.flatten().nonzero().flatten()
    z = torch.diff(pos, prepend=pos.new_tensor([-1])) - 1  # zeros skipped before each non-zero
    fill = torch.div(z, span, rounding_mode="floor")
    per = fill + 1  # entries emitted per non-zero: its fillers, then itself
    total = int(per.sum())
    gaps = torch.full((total,), span - 1, dtype=torch.long, device=mask.device)
    last = torch.cumsum(per, 0) - 1
    gaps[last] = z - fill * span
    is_filler = torch.ones(total, dtype=torch.bool, device=mask.device)
    is_filler[last] = False
    source = torch.repeat_interleave(pos, per)
    return gaps, is_filler, source


def n_fillers(mask: torch.Tensor, index_bits: int) -> int:
    span = 1 << index_bits
    pos = mask.flatten().nonzero().flatten()
    z = torch.diff(pos, prepend=pos.new_tensor([-1])) - 1
    return int(torch.div(z, span, rounding_mode="floor").sum())


def code_bits_for(n_centroids: int) -> int:
    """Bits of a stored code: K centroid codes plus the filler code K (module docstring),
    ``ceil(log2(K + 1))``; e.g. K = 2^b - 1 -> b bits."""
    if not isinstance(n_centroids, int) or n_centroids < 1:
        raise ValueError(f"n_centroids={n_centroids!r}; need an int >= 1")
    return max(1, math.ceil(math.log2(n_centroids + 1)))


def weight_symbols(mask: torch.Tensor, codes: torch.Tensor, n_centroids: int,
                   index_bits: int) -> torch.Tensor:
    """The stored weight-code stream: a surviving weight's code (0 .. K - 1), the reserved
    filler code ``K = n_centroids`` for a filler zero (module docstring)."""
    _, is_filler, source = relative_index_stream(mask, index_bits)
    sym = codes.flatten()[source]
    return torch.where(is_filler, torch.full_like(sym, n_centroids), sym)


@dataclass
class SparseLayerSize:
    """Bits of one layer at each Deep Compression stage (module docstring for the format)."""

    numel: int
    nnz: int
    fillers: int
    index_bits: int
    code_bits: int
    n_centroids: int
    bias_numel: int
    dense_bits: int  # fp32 weight + fp32 bias
    pruned_bits: int  # (nnz + fillers) x (fp32 value + index) + fp32 bias
    shared_bits: int  # (nnz + fillers) x (code + index) + K fp32 centroids + fp32 bias;
    # code = ceil(log2(K + 1)) bits: the codes 0..K-1 and the filler code K
    huffman_weight_bits: int  # Huffman-coded weight-code stream
    huffman_index_bits: int  # Huffman-coded relative-index stream
    huffman_bits: int  # both Huffman streams + K fp32 centroids + fp32 bias

    def as_dict(self) -> dict:
        return asdict(self)


def sparse_layer_size(mask: torch.Tensor, codes: torch.Tensor | None, n_centroids: int,
                      index_bits: int, bias_numel: int = 0, name: str = "weight") -> SparseLayerSize:
    """Sizes of a pruned (``mask``) and weight-shared (``codes`` in 0 .. K - 1, K =
    ``n_centroids``, filler code K) layer.

    With ``codes=None`` (pruned only) the shared and Huffman columns equal the pruned size.
    """
    gaps, is_filler, source = relative_index_stream(mask, index_bits, name)
    nnz, entries = int(mask.sum()), int(gaps.numel())
    bias = 32 * int(bias_numel)
    pruned = entries * (32 + index_bits) + bias
    if codes is None:
        cb, hw, hi, shared, huff = 0, 0, 0, pruned, pruned
    else:
        cb = code_bits_for(n_centroids)
        live = codes.flatten()[mask.flatten()]
        if live.numel() and not 0 <= int(live.min()) <= int(live.max()) < n_centroids:
            raise ValueError(f"{name}: codes of surviving weights must be in 0..{n_centroids - 1}"
                             f" (code {n_centroids} is the filler code)")
        sym = torch.where(is_filler, torch.full_like(source, n_centroids), codes.flatten()[source])
        hw, hi = huffman_bits(sym), huffman_bits(gaps)
        shared = entries * (cb + index_bits) + 32 * n_centroids + bias
        huff = hw + hi + 32 * n_centroids + bias
    return SparseLayerSize(mask.numel(), nnz, entries - nnz, index_bits, cb, n_centroids,
                           int(bias_numel), 32 * (mask.numel() + int(bias_numel)), pruned,
                           shared, hw, hi, huff)
