"""Dynamic fixed point with a shared per-tensor exponent.

Das et al. 2018, "Mixed Precision Training of Convolutional Neural Networks using Integer
Operations" (ICLR), Sec. 3.1: a DFP tensor is a tensor of b-bit signed integers I with one
shared exponent E, value = I * 2^E. The exponent comes from the tensor's absolute maximum
so the largest magnitude fits the b-1 magnitude bits:

    E = floor(log2 max|x|) + 1 - (b - 1),     I = clamp(round(x / 2^E), -(2^(b-1)-1), 2^(b-1)-1)

(max|x| < 2^(E + b - 1); round-up at the top saturates to 2^(b-1)-1). Rounding:
'nearest' (half to even) or 'stochastic' (Gupta 2015; Das et al. use it for the
down-conversion). Gradient: clipped straight-through.
Storage: b bits per element + one 8-bit exponent per tensor.
"""

from __future__ import annotations

import math

import torch

from qtrain.quant.rounding import check_rounding, round_values

DFP_MIN_BITS, DFP_MAX_BITS = 2, 32
EXPONENT_BITS = 8


def check_dfp_bits(bits: int) -> int:
    if not isinstance(bits, int) or not DFP_MIN_BITS <= bits <= DFP_MAX_BITS:
        raise ValueError(f"dynamic fixed point: bits={bits!r} not supported; allowed 2..32")
    return bits


def shared_exponent(x: torch.Tensor, bits: int) -> int:
    """E = floor(log2 max|x|) + 1 - (b - 1); an all-zero tensor gets E = 0."""
    check_dfp_bits(bits)
    amax = x.detach().abs().max().item()
    if not math.isfinite(amax):
        raise ValueError(f"dynamic fixed point: tensor contains non-finite value (max {amax})")
    if amax == 0:
        return 0
    return math.floor(math.log2(amax)) + 1 - (bits - 1)


class _DFP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qmax, rounding, generator):
        q = round_values(x / step, rounding, generator)
        inside = q.abs() <= qmax
        ctx.save_for_backward(inside)
        return q.clamp(-qmax, qmax) * step

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None, None


def dfp_codes(x: torch.Tensor, bits: int, rounding: str = "nearest", generator=None):
    """(integer codes, shared exponent E): x ~ codes * 2^E."""
    check_rounding(rounding)
    e = shared_exponent(x, bits)
    qmax = 2 ** (bits - 1) - 1
    q = round_values(x / 2.0**e, rounding, generator).clamp(-qmax, qmax)
    return q, e


def fake_dfp(
    x: torch.Tensor,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dynamic-fixed-point fake quantization (value and clipped-STE gradient)."""
    check_rounding(rounding)
    e = shared_exponent(x, bits)
    return _DFP.apply(x, 2.0**e, 2 ** (bits - 1) - 1, rounding, generator)
