"""Fixed-point number formats: Gupta et al.'s static <IL, FL> and Das et al.'s dynamic one.

Static fixed point (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision",
ICML, Sec. 3): a number in the format <IL, FL> has IL integer bits (sign included) and FL
fractional bits, word length WL = IL + FL. Its step is eps = 2^-FL and its range
[-2^(IL-1), 2^(IL-1) - 2^-FL]. Conversion (their eq. 3) saturates to the range ends and
otherwise rounds to the grid (eq. 1: round to nearest; eq. 2: stochastic,
P(round up to floor_eps(x) + eps) = (x - floor_eps(x)) / eps, so E[round(x)] = x):

    x_hat = clamp(eps * round(x / eps), -2^(IL-1), 2^(IL-1) - 2^-FL)

(the range ends are grid points, so rounding then clamping equals the paper's saturate-or-
round). The format is the same for every tensor: no per-tensor scale is stored
(:func:`fake_fixed`, :func:`fixed_codes`). Gradient: clipped straight-through (1 inside the
range, 0 where the value saturates) -- the paper trains with fixed-point arithmetic and does
not need a gradient of the conversion; this is the fake-quant simulation's choice.

Dynamic fixed point (Das et al. 2018, "Mixed Precision Training of Convolutional Neural
Networks using Integer Operations", ICLR, Sec. 3.1) is a different format: a DFP tensor is
b-bit signed integers I with one shared exponent E per tensor, value = I * 2^E. The exponent
comes from the tensor's absolute maximum so the largest magnitude fits the b-1 magnitude
bits:

    E = floor(log2 max|x|) + 1 - (b - 1),     I = clamp(round(x / 2^E), -(2^(b-1)-1), 2^(b-1)-1)

(max|x| < 2^(E + b - 1); round-up at the top saturates to 2^(b-1)-1). Rounding:
'nearest' (half to even) or 'stochastic'. Gradient: clipped straight-through.
Storage: b bits per element + one 8-bit exponent per tensor (:func:`fake_dfp`).
"""

from __future__ import annotations

import math

import torch

from qtrain.errors import ConfigError
from qtrain.quant.rounding import check_rounding, round_values

DFP_MIN_BITS, DFP_MAX_BITS = 2, 32
EXPONENT_BITS = 8


def check_dfp_bits(bits: int) -> int:
    if not isinstance(bits, int) or not DFP_MIN_BITS <= bits <= DFP_MAX_BITS:
        raise ValueError(f"dynamic fixed point: bits={bits!r} not supported; allowed 2..32")
    return bits


def shared_exponent(x: torch.Tensor, bits: int) -> int:
    """E = floor(log2 max|x|) + 1 - (b - 1); an all-zero tensor gets E = 0. E is kept >= the
    exponent of the smallest subnormal of x's dtype (2^-149 for float32), so the step 2^E is
    representable: for a tensor of subnormals the formula gives a step that underflows to 0
    (x = 2.9e-44, 7 bits: E = -150 -> every value quantized to 0)."""
    check_dfp_bits(bits)
    amax = x.detach().abs().max().item()
    if not math.isfinite(amax):
        raise ValueError(f"dynamic fixed point: tensor contains non-finite value (max {amax})")
    if amax == 0:
        return 0
    e = math.floor(math.log2(amax)) + 1 - (bits - 1)
    if x.is_floating_point():
        fi = torch.finfo(x.dtype)
        e = max(e, round(math.log2(fi.tiny * fi.eps)))
    return e


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


# -- static <IL, FL> fixed point (Gupta et al. 2015) ------------------------------------------
FIXED_MAX_WORD_LENGTH = 32


def check_fixed_format(int_bits: int, frac_bits: int, what: str = "fixed point") -> None:
    """<IL, FL>: IL >= 1 (the sign bit is one of the integer bits), FL >= 0, IL + FL <= 32."""
    for key, v, lo in (("int_bits", int_bits, 1), ("frac_bits", frac_bits, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{what}: {key}={v!r} must be an int >= {lo}")
    if int_bits + frac_bits > FIXED_MAX_WORD_LENGTH:
        raise ConfigError(f"{what}: word length int_bits + frac_bits = {int_bits + frac_bits}; "
                          f"allowed at most {FIXED_MAX_WORD_LENGTH}")


def fixed_range(int_bits: int, frac_bits: int) -> tuple[float, float]:
    """(-2^(IL-1), 2^(IL-1) - 2^-FL): the saturation ends of <IL, FL> (Gupta 2015 eq. 3)."""
    check_fixed_format(int_bits, frac_bits)
    return -(2.0 ** (int_bits - 1)), 2.0 ** (int_bits - 1) - 2.0**-frac_bits


class _Fixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, lo, hi, rounding, generator):
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return (round_values(x / step, rounding, generator) * step).clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None, None, None


def fake_fixed(
    x: torch.Tensor, int_bits: int, frac_bits: int, rounding: str = "stochastic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gupta 2015 Convert(x, <IL, FL>) (eq. 1-3) with the clipped straight-through gradient.

    ``rounding``: 'stochastic' (eq. 2, the paper's method) | 'nearest' (eq. 1; ties to even,
    the paper rounds ties up -- a measure-zero difference) | 'truncate'.
    """
    check_rounding(rounding)
    lo, hi = fixed_range(int_bits, frac_bits)
    return _Fixed.apply(x, 2.0**-frac_bits, lo, hi, rounding, generator)


def fixed_codes(x: torch.Tensor, int_bits: int, frac_bits: int, rounding: str = "nearest",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes q in [-2^(WL-1), 2^(WL-1) - 1] with x_hat = q * 2^-FL (WL = IL + FL)."""
    check_rounding(rounding)
    check_fixed_format(int_bits, frac_bits)
    wl = int_bits + frac_bits
    q = round_values(x * 2.0**frac_bits, rounding, generator)
    return q.clamp(-(2.0 ** (wl - 1)), 2.0 ** (wl - 1) - 1)
