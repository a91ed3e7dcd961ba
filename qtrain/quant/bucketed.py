"""Bucketed min-max uniform quantization (Polino et al. 2018, "Model compression via
distillation and quantization", ICLR, sec. 2.1 "Bucketing").

The tensor is flattened and cut into buckets of ``bucket_size`` consecutive elements (256 in
the paper); the last, shorter bucket is padded with copies of the last element (as the
authors' code does), which leaves its min and max unchanged. Each bucket v is scaled to
[0, 1] with its own alpha = max(v) - min(v), beta = min(v), quantized uniformly to
s = 2^bits points {0, 1/(s-1), ..., 1} and scaled back:

    Q(v) = alpha * round((v - beta) / alpha * (s - 1)) / (s - 1) + beta          (eq. 2-3)

Unlike :class:`qtrain.nn.uniform_quantizer.UniformQuantizer` (granularity='group'), the range
is exactly [min, max] of the bucket (not widened to contain 0, no integer zero-point) and
buckets run over the flattened tensor (no divisibility constraint on rows).
Rounding: 'nearest' (half to even; the authors' code rounds ties down -- a measure-zero
difference) or 'stochastic' (unbiased, the variant of the paper's analysis).
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.quant.rounding import check_rounding, round_values

MIN_BITS, MAX_BITS = 1, 16
_EPS = 1e-12


def num_buckets(numel: int, bucket_size: int) -> int:
    return -(-numel // bucket_size)


def check_bucket_args(bits: int, bucket_size: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bucketed quantization: bits={bits!r}; allowed {MIN_BITS}..{MAX_BITS}")
    if not isinstance(bucket_size, int) or bucket_size < 1:
        raise ConfigError(f"bucketed quantization: bucket_size={bucket_size!r}; must be an int >= 1")


def bucket_quantize(x: torch.Tensor, bits: int, bucket_size: int = 256, rounding: str = "nearest",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Q(x) of the module docstring (no gradient path); same shape and dtype as ``x``."""
    check_bucket_args(bits, bucket_size)
    check_rounding(rounding)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = num_buckets(n, bucket_size) * bucket_size - n
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    v = flat.reshape(-1, bucket_size)
    beta = v.amin(dim=1, keepdim=True)
    alpha = (v.amax(dim=1, keepdim=True) - beta).clamp_min(_EPS)
    levels = 2**bits - 1
    q = round_values((v - beta) / alpha * levels, rounding, generator).clamp(0, levels)
    out = q / levels * alpha + beta
    return out.reshape(-1)[:n].reshape(x.shape).to(x.dtype)


def fake_bucket_quantize(x: torch.Tensor, bits: int, bucket_size: int = 256,
                         rounding: str = "nearest", generator=None) -> torch.Tensor:
    """:func:`bucket_quantize` with the straight-through gradient: the gradient computed at the
    quantized weights is applied to the float weights (Polino 2018, Algorithm 1)."""
    return x + (bucket_quantize(x, bits, bucket_size, rounding, generator) - x).detach()
