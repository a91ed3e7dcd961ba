"""Rounding modes shared by the uniform, fixed-point, float and power-of-two formats.

* ``'nearest'``: round half to even (IEEE 754 default; ``torch.round``), as in PyTorch's
  fake-quant ops and float casts.
* ``'stochastic'``: Gupta et al. 2015, "Deep Learning with Limited Numerical Precision",
  eq. (2): round(x) = floor(x) + 1 with probability x - floor(x), else floor(x). It is
  unbiased, E[round(x)] = x. Randomness comes from an optional ``torch.Generator`` so a
  run is reproducible from a seed.
* ``'truncate'``: round toward zero (mantissa truncation).

Each function acts on values already divided by the step (the grid is the integers).
"""

from __future__ import annotations

import hashlib

import torch

ROUNDING_MODES = ("nearest", "stochastic", "truncate")


def derive_seed(seed: int, *keys: str) -> int:
    """A seed of its own for each ``keys`` (e.g. layer name and role) from a run's ``seed``:
    the first 63 bits of SHA-256 over ``seed`` and the keys. Stable across processes and
    Python versions (unlike ``hash``), so a run's random rounding is reproducible, and
    different for every layer: generators seeded alike would round every layer of the same
    shape with the same random draws (perfectly correlated rounding noise across layers)."""
    h = hashlib.sha256("\0".join([str(int(seed)), *keys]).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def check_rounding(rounding: str, what: str = "rounding") -> str:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{what}={rounding!r} not supported; allowed: {ROUNDING_MODES}")
    return rounding


def round_nearest_even(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (2.5 -> 2, 3.5 -> 4)."""
    return torch.round(x)


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gupta 2015 eq. (2): floor(x) + [u < x - floor(x)], u ~ U[0, 1) (unbiased)."""
    floor = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return floor + (u < (x - floor)).to(x.dtype)


def round_values(
    x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round ``x`` to integers with the given mode (see module docstring)."""
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "stochastic":
        return stochastic_round(x, generator)
    if rounding == "truncate":
        return torch.trunc(x)
    check_rounding(rounding)
    raise AssertionError  # unreachable


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rounding, generator):
        return round_values(x, rounding, generator)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def round_ste(
    x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rounding with the straight-through gradient d round(x)/dx := 1 (Bengio 2013)."""
    return _RoundSTE.apply(x, rounding, generator)


class _FakeQuantRoundedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, rounding, generator):
        unclamped = round_values(x * scale.reciprocal(), rounding, generator) + zero_point
        inside = (unclamped >= qmin) & (unclamped <= qmax)
        ctx.save_for_backward(inside)
        return (unclamped.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None, None, None, None


def fake_quantize_rounded(
    x: torch.Tensor, qp, rounding: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform fake-quant (:mod:`qtrain.quant.uniform` QParams) with a selectable rounding.

    Same clipped straight-through gradient as :func:`qtrain.quant.uniform.fake_quantize`;
    with ``rounding='nearest'`` the result equals it.
    """
    check_rounding(rounding)
    return _FakeQuantRoundedSTE.apply(
        x, qp.scale, qp.zero_point, qp.qmin, qp.qmax, rounding, generator
    )
