"""Value-aware quantization (Park, Yoo & Vajda 2018, "Value-aware Quantization for Training
and Inference of Neural Networks", ECCV, Sec. 3).

The ``ratio`` (default 1%; the paper uses 1-3%) of entries with the largest magnitude are
kept in full precision; the rest are uniformly quantized on the range narrowed to the
remaining values (min/max over the non-outliers), so the small values get a fine grid.
Gradient: identity for the kept values, clipped STE (all in range) for the others.

Storage (:func:`value_aware_storage_bits`): dense ``bits``-bit codes for every entry
(outlier positions hold an unused code), plus per outlier its ``value_bits`` value and a
ceil(log2 numel)-bit index, plus the scale (and zero-point if affine).
"""

from __future__ import annotations

import math

import torch

from qtrain.errors import ConfigError
from qtrain.quant import uniform as U


def outlier_count(numel: int, ratio: float) -> int:
    if not 0 <= ratio < 1:
        raise ConfigError(f"value-aware quantization: ratio={ratio} must be in [0, 1)")
    return min(int(math.ceil(ratio * numel)), numel - 1)


def outlier_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ceil(ratio * numel) largest |x| entries."""
    k = outlier_count(x.numel(), ratio)
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    if k:
        mask[x.detach().abs().flatten().topk(k).indices] = True
    return mask.reshape(x.shape)


def value_aware_fake_quantize(
    x: torch.Tensor, bits: int, ratio: float = 0.01, symmetric: bool = True,
    name: str = "tensor",
) -> torch.Tensor:
    U.check_finite(x, name)
    mask = outlier_mask(x, ratio)
    inl = x.detach()[~mask]
    qp = U.qparams_from_range(inl.min(), inl.max(), bits, symmetric)
    return torch.where(mask, x, U.fake_quantize(x, qp))


def value_aware_storage_bits(
    numel: int, bits: int, ratio: float, symmetric: bool = True, value_bits: int = 32,
    scale_bits: int = 32,
) -> int:
    k = outlier_count(numel, ratio)
    index_bits = max(1, math.ceil(math.log2(numel))) if numel > 1 else 1
    zp = 0 if symmetric else bits
    return numel * bits + k * (value_bits + index_bits) + scale_bits + zp
