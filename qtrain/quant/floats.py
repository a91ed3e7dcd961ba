"""Simulated low-precision floating point: FP16, BF16, FP8 E4M3 / E5M2, and S2FP8.

A value is rounded to the nearest number of a format with ``man`` mantissa bits and
exponent range [e_min, e_max] (subnormals included), computed in fp32 arithmetic:

    E    = max(floor(log2 |x|), e_min)            (torch.frexp, exact)
    step = 2^(E - man)                            (spacing of the format around x)
    x^   = round(x / step) * step                 (round half to even by default)

Formats (``FORMATS``): fp16 = IEEE binary16 (e5m10, max 65504), bf16 (e8m7, max
3.39e38), e4m3 = OCP FP8 E4M3 "fn" variant (no inf, max 448, NaN = S.1111.111), e5m2 = OCP
FP8 E5M2 (IEEE-like, max 57344, has inf).

Overflow (``saturate``):
* ``True``: values beyond +-max (inf included) are clamped to +-max *before* rounding; NaN
  stays NaN. This is the OCP "satfinite" conversion and what ``x.to(torch.float8_e4m3fn)``
  does in PyTorch >= 2.x.
* ``False``: IEEE overflow: a value whose rounded magnitude exceeds max becomes +-inf (fp16,
  bf16, e5m2; equals ``x.to(torch.float16 / bfloat16 / float8_e5m2)``) or NaN (e4m3fn, which
  has no inf encoding; OCP's non-saturating mode).
``saturate=None`` picks the PyTorch cast's behaviour per format (True for e4m3, else False),
so that ``simulate_float(x, fmt)`` equals a cast through the torch dtype
(tests/quant/test_float_formats.py).

Gradient (:func:`fake_float`): straight-through, zero where the input lies outside
[-max, max] when saturating (clipped STE), identity elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.quant.rounding import check_rounding, round_values


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exp_bits: int
    man_bits: int
    max_value: float
    has_inf: bool

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def e_min(self) -> int:
        """Exponent of the smallest normal number (1 - bias)."""
        return 1 - self.bias

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.e_min - self.man_bits)


FORMATS = {
    "fp16": FloatFormat("fp16", 5, 10, 65504.0, True),
    "bf16": FloatFormat("bf16", 8, 7, float(torch.finfo(torch.bfloat16).max), True),
    "e4m3": FloatFormat("e4m3", 4, 3, 448.0, False),
    "e5m2": FloatFormat("e5m2", 5, 2, 57344.0, True),
}
TORCH_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}


def get_format(fmt: str | FloatFormat) -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FORMATS:
        raise ConfigError(f"float format {fmt!r} not supported; allowed: {tuple(FORMATS)}")
    return FORMATS[fmt]


def default_saturate(fmt: str | FloatFormat) -> bool:
    """PyTorch's cast behaviour: e4m3fn saturates, the formats with inf overflow to inf."""
    return not get_format(fmt).has_inf


def simulate_float(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    saturate: bool | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` (fp32) to the nearest value of ``fmt``; returns fp32 (see module doc).

    ``rounding``: 'nearest' (half to even), 'stochastic' (Gupta 2015) or 'truncate'
    (toward zero).
    """
    f = get_format(fmt)
    check_rounding(rounding)
    if saturate is None:
        saturate = default_saturate(f)
    x = x.float()
    if saturate:
        x = x.clamp(-f.max_value, f.max_value)  # NaN passes through clamp
    _, e = torch.frexp(x)  # x = m * 2^e, |m| in [0.5, 1): floor(log2|x|) = e - 1
    exp = (e - 1).clamp_min(f.e_min)
    step = torch.ldexp(torch.ones_like(x), exp - f.man_bits)
    q = round_values(x / step, rounding, generator) * step
    if saturate:  # stochastic rounding may step past max
        q = q.clamp(-f.max_value, f.max_value)
    finite = torch.isfinite(x)
    overflow = finite & (q.abs() > f.max_value)
    if overflow.any():
        big = torch.copysign(torch.full_like(q, math.inf), x) if f.has_inf else torch.full_like(
            q, math.nan
        )
        q = torch.where(overflow, big, q)
    if not finite.all():  # inf/NaN inputs (not saturating): inf stays inf, or NaN without inf
        special = x if f.has_inf else torch.full_like(x, math.nan)
        q = torch.where(finite, q, special)
    return q


class _FakeFloat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, saturate, rounding, generator):
        f = get_format(fmt)
        sat = default_saturate(f) if saturate is None else saturate
        out = simulate_float(x, f, sat, rounding, generator).to(x.dtype)
        ctx.save_for_backward(x.abs() <= f.max_value if sat else None)
        return out

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return (g if inside is None else g * inside), None, None, None, None


def fake_float(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    saturate: bool | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`simulate_float` with the straight-through gradient (clipped when saturating)."""
    return _FakeFloat.apply(x, fmt, saturate, rounding, generator)


# ---------------------------------------------------------------------------------------
# S2FP8: Cambier et al. 2020, "Shifted and Squeezed 8-bit Floating Point Format for
# Low-Precision Training of Deep Neural Networks" (ICLR), Sec. 3.
# ---------------------------------------------------------------------------------------

S2FP8_TARGET_MAX = 15.0  # max(log2|Y|) after squeeze-and-shift (E5M2 max is 1.75 * 2^15)


def s2fp8_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squeeze ``alpha`` and shift ``beta`` of a tensor (Cambier 2020, eq. 3-4).

    Over the non-zero entries, mu = mean(log2|X|) and m = max(log2|X|);
    alpha = 15 / (m - mu), beta = -alpha * mu, so that Y = alpha log2|X| + beta has mean 0
    and maximum 15. A tensor whose non-zero magnitudes are all equal (m = mu) gets
    alpha = 1 (a pure shift); an all-zero tensor gets alpha = 1, beta = 0.
    """
    a = x.detach().float().abs()
    nz = a > 0
    if not nz.any():
        return torch.tensor(1.0, device=x.device), torch.tensor(0.0, device=x.device)
    logs = torch.log2(a[nz])
    mu, m = logs.mean(), logs.max()
    spread = m - mu
    alpha = torch.where(spread > 0, S2FP8_TARGET_MAX / spread.clamp_min(1e-30), torch.ones_like(mu))
    return alpha, -alpha * mu


def s2fp8_quantize(
    x: torch.Tensor,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Value of ``x`` after a round trip through S2FP8 (fp32 in, fp32 out).

    Equations implemented (Cambier 2020, Sec. 3):
        (alpha, beta) = s2fp8_stats(X)
        Y_i  = sign(X_i) * 2^(alpha * log2|X_i| + beta)          (squeeze and shift)
        Y^_i = FP8_E5M2(Y_i)                                      (8-bit storage)
        X^_i = sign(Y^_i) * 2^((log2|Y^_i| - beta) / alpha)      (inverse map)
    with zeros kept exactly (log2 0 is excluded from the statistics). The paper calls the
    FP32 -> FP8 reduction "truncation" without fixing the mantissa rounding; we use
    round-half-to-even by default and offer ``rounding='truncate'`` (toward zero) and
    'stochastic'. E5M2 saturates here (|Y| <= 2^15.8 by construction anyway).
    """
    alpha, beta = s2fp8_stats(x)
    xf = x.float()
    a = xf.abs()
    nz = a > 0
    log_y = alpha * torch.log2(torch.where(nz, a, torch.ones_like(a))) + beta
    y = torch.exp2(log_y)
    y_hat = simulate_float(y, "e5m2", saturate=True, rounding=rounding, generator=generator)
    ok = nz & (y_hat > 0)
    log_yh = torch.log2(torch.where(ok, y_hat, torch.ones_like(y_hat)))
    mag = torch.exp2((log_yh - beta) / alpha)
    return torch.where(ok, torch.copysign(mag, xf), torch.zeros_like(xf)).to(x.dtype)


class _FakeS2FP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rounding, generator):
        return s2fp8_quantize(x, rounding, generator)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def fake_s2fp8(
    x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`s2fp8_quantize` with the straight-through gradient."""
    return _FakeS2FP8.apply(x, rounding, generator)
