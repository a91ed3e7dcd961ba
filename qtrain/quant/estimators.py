"""Gradient estimators for rounding and the DoReFa-Net quantizers (pure autograd functions).

* Straight-through estimator (Bengio et al. 2013; Hinton's lecture 15b): the forward rounds,
  the backward passes the gradient unchanged (:func:`ste_round`).
* Clipped STE (Courbariaux et al. 2016 / Hubara "BNN" eq. 4; the estimator PyTorch's
  fake-quant ops use): ``clamp(round(x), lo, hi)`` forward, gradient ``1[lo <= x <= hi]``
  (:func:`clipped_ste_round`).
* DoReFa-Net (Zhou et al. 2016, arXiv:1606.06160):

  - eq. (5): ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` for r in [0, 1], STE backward
    (:func:`dorefa_quantize_k`);
  - eq. (9): k-bit weights ``2 quantize_k(tanh w / (2 max|tanh w|) + 1/2) - 1``; the backward
    differentiates tanh and the max normalisation and uses the STE for ``quantize_k``, like
    the authors' tensorpack code (:func:`dorefa_weight`);
  - eq. (7)/(8): 1-bit weights ``sign(w) * E|w|`` with identity gradient and ``E|w|`` treated
    as a constant (tensorpack ``stop_gradient``); ``sign(0)`` is taken as +1 so that every
    weight has exactly one of two values;
  - eq. (11): activations ``quantize_k(clip(x, 0, 1))`` (gradient zero outside [0, 1]) (:func:`dorefa_activation`);
  - eq. (12): k-bit gradients ``2 max0|dr| [quantize_k(dr / (2 max0|dr|) + 1/2 + N(k)) - 1/2]``,
    ``N(k) ~ U(-1/2, 1/2) / (2^k - 1)``, where ``max0`` is taken over all axes except the batch
    axis (``per_sample=True``, the paper) or over the whole tensor (``per_sample=False``).
    The added noise makes the quantizer unbiased: E[out] = dr. The forward is the identity;
    only the backward is quantized (:func:`quantize_gradient`). A ``torch.Generator`` makes
    the noise reproducible.
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError

MIN_BITS, MAX_BITS = 1, 32


def _check_bits(k: int, what: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not MIN_BITS <= k <= MAX_BITS:
        raise ConfigError(f"{what}: bits={k!r} not supported; allowed: {MIN_BITS}..{MAX_BITS}")
    return k


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ClippedRoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return torch.round(x).clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) with the plain straight-through gradient dL/dx = dL/dy."""
    return _RoundSTE.apply(x)


def clipped_ste_round(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(round(x), lo, hi)`` with gradient dL/dy where lo <= x <= hi, else 0."""
    if not lo < hi:
        raise ValueError(f"clipped_ste_round: need lo < hi, got lo={lo}, hi={hi}")
    return _ClippedRoundSTE.apply(x, lo, hi)


def dorefa_quantize_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa eq. (5): ``round((2^k - 1) x) / (2^k - 1)`` with the STE (x expected in [0, 1])."""
    n = float(2 ** _check_bits(k, "dorefa_quantize_k") - 1)
    return ste_round(x * n) / n


class _SignMeanSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        e = w.abs().mean()
        return torch.where(w >= 0, e, -e)

    @staticmethod
    def backward(ctx, g):
        return g


def dorefa_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa k-bit weights: eq. (9) for k > 1, ``sign(w) E|w|`` (eqs. 7-8) for k = 1.

    k >= 32 returns ``w`` unchanged (full precision, as in the paper's tables).
    """
    _check_bits(k, "dorefa_weight")
    if k >= 32:
        return w
    if k == 1:
        return _SignMeanSTE.apply(w)
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5  # all-zero w stays finite
    return 2 * dorefa_quantize_k(t, k) - 1


def dorefa_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa eq. (11): ``quantize_k(clip(x, 0, 1))``; gradient 0 outside [0, 1]."""
    _check_bits(k, "dorefa_activation")
    if k >= 32:
        return x
    return dorefa_quantize_k(torch.clamp(x, 0.0, 1.0), k)


def quantize_gradient_value(
    dr: torch.Tensor, k: int, per_sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DoReFa eq. (12) applied to a tensor ``dr`` (the value a gradient is replaced by).

    ``2 m [quantize_k(dr / (2 m) + 1/2 + N(k)) - 1/2]`` with ``m = max|dr|`` over all axes but
    the first (``per_sample``) or over the whole tensor, ``N(k) ~ U(-1/2, 1/2) / (2^k - 1)``.
    The argument of ``quantize_k`` is clipped to [0, 1] (as in the authors' code; this only
    matters on a measure-zero set). Rows with ``m = 0`` stay 0.
    """
    _check_bits(k, "quantize_gradient")
    n = float(2**k - 1)
    if per_sample and dr.dim() > 1:
        m = dr.abs().amax(dim=tuple(range(1, dr.dim())), keepdim=True)
    else:
        m = dr.abs().max()
    safe = torch.where(m > 0, m, torch.ones_like(m))
    noise = (torch.rand(dr.shape, generator=generator, dtype=dr.dtype, device=dr.device) - 0.5) / n
    v = (dr / (2 * safe) + 0.5 + noise).clamp(0.0, 1.0)
    out = 2 * safe * (torch.round(v * n) / n - 0.5)
    return torch.where(m > 0, out, torch.zeros_like(out))


class _QuantizeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, per_sample, generator):
        ctx.k, ctx.per_sample, ctx.generator = k, per_sample, generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return quantize_gradient_value(g, ctx.k, ctx.per_sample, ctx.generator), None, None, None


def quantize_gradient(
    x: torch.Tensor, k: int, per_sample: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Identity in the forward; the gradient flowing back through it is quantized to k bits
    with DoReFa eq. (12) (see :func:`quantize_gradient_value`)."""
    _check_bits(k, "quantize_gradient")
    if k >= 32:
        return x
    return _QuantizeGrad.apply(x, k, per_sample, generator)
