"""Power-of-two quantization: INQ levels and shift-only (power-of-two) scales.

INQ, Zhou et al. 2017, "Incremental Network Quantization", eq. (2)-(4): for a layer with
s = max|W| and bit width b (one bit codes the zero/sign, b-1 bits the exponent),
    n1 = floor(log2(4 s / 3)),   n2 = n1 + 1 - 2^(b-1) / 2,
    P  = {0} U {+-2^k : n2 <= k <= n1}.
Each weight goes to the nearest element of P; a tie goes to the larger magnitude (eq. 4:
beta if (alpha + beta)/2 <= |w| < 3 beta / 2), so |w| < 2^(n2-1) becomes 0. b = 5 gives 8
exponents, b = 2 is ternary {0, +-2^n1}.

Shift-only scales (Courbariaux et al. 2015, "Training deep neural networks with low
precision multiplications", power-of-two scaling factors; also Jain et al. 2020): a scale
s is replaced by 2^ceil(log2 s) (``'ceil'``: never clips the range) or 2^round(log2 s)
(``'nearest'``), so rescaling is a bit shift.
"""

from __future__ import annotations

import math

import torch

from qtrain.errors import ConfigError

INQ_MIN_BITS, INQ_MAX_BITS = 2, 8


def inq_exponent_range(weight: torch.Tensor, bits: int) -> tuple[int, int]:
    """(n1, n2) of INQ eq. (2)-(3) for ``weight``."""
    if not isinstance(bits, int) or not INQ_MIN_BITS <= bits <= INQ_MAX_BITS:
        raise ConfigError(f"INQ power-of-two levels: bits={bits!r} not supported; allowed 2..8")
    s = weight.detach().abs().max().item()
    if not math.isfinite(s):
        raise ValueError(f"INQ power-of-two levels: weight contains non-finite value (max {s})")
    if s == 0:
        raise ValueError("INQ power-of-two levels: weight is all zeros (max|W| = 0)")
    n1 = math.floor(math.log2(4 * s / 3))
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    return n1, n2


def inq_levels(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Sorted level set P = {0} U {+-2^k, n2 <= k <= n1} (INQ eq. 2), dtype of ``weight``."""
    n1, n2 = inq_exponent_range(weight, bits)
    pos = torch.pow(2.0, torch.arange(n2, n1 + 1, dtype=torch.float64))
    levels = torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos])
    return levels.to(dtype=weight.dtype, device=weight.device)


def round_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest element of the sorted 1-D ``levels``; ties go to the larger magnitude.

    Vectorised with ``torch.bucketize`` on the midpoints (no per-element loop).
    """
    if levels.dim() != 1 or levels.numel() == 0:
        raise ValueError(f"levels must be a non-empty 1-D tensor, got shape {tuple(levels.shape)}")
    levels = levels.to(device=x.device, dtype=x.dtype)
    if levels.numel() == 1:
        return levels.expand_as(x).clone()
    mids = (levels[:-1] + levels[1:]) / 2
    up = torch.bucketize(x, mids, right=True)  # tie -> upper level (positive x)
    down = torch.bucketize(x, mids, right=False)  # tie -> lower level (negative x)
    return levels[torch.where(x >= 0, up, down)]


class _LevelsSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels):
        return round_to_levels(x, levels)

    @staticmethod
    def backward(ctx, g):
        return g, None


def inq_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Weight rounded to its INQ power-of-two levels, with the straight-through gradient."""
    return _LevelsSTE.apply(weight, inq_levels(weight, bits))


def pow2_scale(scale: torch.Tensor, mode: str = "ceil") -> torch.Tensor:
    """Round a positive scale to a power of two (shift-only rescaling)."""
    if mode == "ceil":
        return torch.exp2(torch.ceil(torch.log2(scale)))
    if mode == "nearest":
        return torch.exp2(torch.round(torch.log2(scale)))
    raise ConfigError(f"power-of-two scale mode={mode!r} not supported; allowed: 'ceil', 'nearest'")
