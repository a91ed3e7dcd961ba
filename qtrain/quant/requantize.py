"""Fixed-point requantization for integer-only inference (Jacob et al. 2018, sec. 2.2).

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", eq. (5)-(6): the real multiplier M = S1 S2 / S3 of a
layer (empirically in (0, 1)) is written M = 2^-n M0 with M0 in [0.5, 1) held as an int32
fixed-point number (eq. 6). Here, as in the authors' code (gemmlowp / TensorFlow Lite's
``QuantizeMultiplier``), M0 is the int32 Q0.31 value, so

    M = M0 * 2^-31 * 2^-n,   M0 in [2^30, 2^31)                         (eq. 6)

The multiplication of the int32 accumulator by M is done in two integer steps (sec. 2.2
and the Appendix; gemmlowp ``fixedpoint.h``):

* :func:`saturating_rounding_doubling_high_mul` (gemmlowp ``SaturatingRoundingDoublingHighMul``,
  ARM ``SQRDMULH``): the high 32 bits of 2 a b, rounded to nearest (nudge +2^30 for
  a b >= 0, 1 - 2^30 otherwise, then division by 2^31 truncating toward zero; worked out,
  this is floor(a b / 2^31 + 1/2): ties go toward +infinity for either sign); the one
  overflow case a = b = -2^31 saturates to 2^31 - 1.
* :func:`rounding_divide_by_pot` (gemmlowp ``RoundingDivideByPOT``, ARM ``SRSHL`` with a
  fix-up): x / 2^exponent rounded to nearest, ties away from zero (the paper's Appendix:
  "round-to-nearest ... upwards in the case of ties is not what we want": the fix-up makes
  ties go away from zero for negative x too).

A multiplier M >= 1 (the residual add's rescaling can need one) is written with n < 0,
i.e. a left shift before the high-mul, as TFLite's ``MultiplyByQuantizedMultiplier``
(shift > 0: left shift, then SRDHM, then no right shift).

Pure tensor math on integer tensors (int32 values carried in int64 tensors so the products
do not overflow); no Lightning, no float in the integer paths.
"""

from __future__ import annotations

import math

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(m: float) -> tuple[int, int]:
    """(M0, n) with M = M0 * 2^-31 * 2^-n, M0 in [2^30, 2^31) (eq. 6; TFLite
    ``QuantizeMultiplier``: frexp, M0 = round(q 2^31) with ties away from zero, a rounding up
    to 2^31 halves M0 and bumps the exponent). M = 0 gives (0, 0). n < 0 means M >= 1 (a left
    shift by -n)."""
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"quantize_multiplier: M={m!r}; allowed: a finite M >= 0")
    if m == 0:
        return 0, 0
    q, e = math.frexp(m)  # m = q 2^e, q in [0.5, 1)
    m0 = int(math.floor(q * 2**31 + 0.5))  # q > 0: std::round (half away from zero)
    if m0 == 2**31:
        m0 //= 2
        e += 1
    n = -e
    if n > 31:  # M < 2^-32: TFLite's QuantizeMultiplier sets M0 = 0, shift 0 (M x rounds to 0)
        return 0, 0
    if n < -31:
        raise ValueError(f"quantize_multiplier: M={m!r} >= 2^31 cannot be applied to an int32 accumulator")
    return m0, n


def quantize_multiplier_tensor(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise :func:`quantize_multiplier` (per-channel multipliers); int64 tensors."""
    pairs = [quantize_multiplier(float(v)) for v in m.detach().double().flatten().tolist()]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(m.shape)
    n = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(m.shape)
    return m0, n


def _check_int(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: integer tensor required (int32 or int64), got {x.dtype}")


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values: floor(a b / 2^31 + 1/2)
    by the nudge in the module docstring; result int64 holding int32 values."""
    _check_int(a, "saturating_rounding_doubling_high_mul")
    a = a.to(torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    out = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, torch.full_like(out, INT32_MAX), out)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: x / 2^exponent, to nearest, ties away from zero
    (0 <= exponent <= 31; per element or broadcast)."""
    _check_int(x, "rounding_divide_by_pot")
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    if bool((e < 0).any()) or bool((e > 31).any()):
        raise ValueError("rounding_divide_by_pot: exponent must be in [0, 31]")
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(
    x: torch.Tensor, m0: torch.Tensor | int, n: torch.Tensor | int
) -> torch.Tensor:
    """x * M for M = M0 2^-31 2^-n, in integers (TFLite ``MultiplyByQuantizedMultiplier``):
    left shift by max(-n, 0), SRDHM by M0, rounding divide by 2^max(n, 0). ``x`` holds
    int32 values (the accumulator); per-channel ``m0`` / ``n`` broadcast against ``x``."""
    _check_int(x, "multiply_by_quantized_multiplier")
    x = x.to(torch.int64)
    m0 = torch.as_tensor(m0, dtype=torch.int64, device=x.device)
    n = torch.as_tensor(n, dtype=torch.int64, device=x.device)
    left = torch.clamp(-n, min=0)
    right = torch.clamp(n, min=0)
    shifted = x << left
    if bool(((shifted < INT32_MIN) | (shifted > INT32_MAX)).any()):
        raise OverflowError("multiply_by_quantized_multiplier: left-shifted value leaves int32")
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right)


def requantize(
    acc: torch.Tensor, m0, n, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """Eq. (7)'s last step: q3 = clamp(Z3 + M acc, qmin, qmax) with M applied by
    :func:`multiply_by_quantized_multiplier`. A fused ReLU is ``qmin = Z3`` (sec. 2.4:
    "clamping to [Z3, 255]"), ReLU6 also lowers ``qmax``. int64 tensor of codes."""
    out = multiply_by_quantized_multiplier(acc, m0, n) + int(zero_point)
    return out.clamp(int(qmin), int(qmax))


def check_int32(acc: torch.Tensor, what: str) -> torch.Tensor:
    """The accumulator is int32 (sec. 2.3): raise if a value leaves the int32 range."""
    if acc.numel() and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        raise OverflowError(f"{what}: int32 accumulator overflow")
    return acc
