"""Weight projections and distortions of Merolla et al. 2016, "Deep neural networks are robust
to weight binarization and other non-linear distortions" (arXiv 1606.01981), as pure tensor
math, and the effective bits per weight of a distorted layer.

Every function maps one layer's weight ``w`` to its projected / distorted value (same shape).
The paper normalizes each layer k by alpha_k so that its weights lie in [-1, 1] before the
projections that need it, and scales back (our reading of its projection table, ~, not
re-verified against the paper's text): ``alpha_k = max_i |w_ki|`` (``scale='max_abs'``, the
default), ``'mean_abs'`` (XNOR-Net's per-layer scale) or ``'none'`` (alpha = 1:
BinaryConnect's raw +-1 weights).

Projections (``u = w / alpha``):

* ``binary``: alpha * sign(w), sign(0) = +1 (BinaryConnect deterministic, Courbariaux et al.
  2015 eq. 1; :func:`qtrain.quant.binary.binary_sign`).
* ``stochastic_binary``: alpha * (+1 with probability p = hard_sigmoid(u) =
  clip((u + 1) / 2, 0, 1), else -1) (BinaryConnect eq. 2-3). Unbiased inside the box:
  E = alpha * (2p - 1) = alpha * clip(u, -1, 1) = clip(w, -alpha, alpha).
* ``kquant``: k uniform levels alpha * (-1 + 2j / (k - 1)), j = 0..k-1, on [-alpha, alpha];
  code j = round((clip(u, -1, 1) + 1) (k - 1) / 2), rounding ``nearest`` (half to even) or
  ``stochastic`` (Gupta et al. 2015 eq. 2, unbiased; :mod:`qtrain.quant.rounding`).
* ``power``: alpha * sign(u) |clip(u, -1, 1)|^beta: the family of non-linear projections with
  binarization as its limit beta -> 0 (beta = 1: identity inside the box).
* ``clip``: clamp(w, -c, c) (BinaryConnect's weight clip, here as a projection).
* ``mult_noise``: w (1 + sigma n), n ~ N(0, 1) per weight (Gaussian DropConnect-like).
* ``add_noise``: w + sigma std(w) n: additive Gaussian noise, sigma relative to the layer's
  weight standard deviation (our parameterization: the SNR is 1 / sigma^2 in every layer).
* ``stochastic_multiply``: w u, u ~ U[gamma, 1 / gamma] per weight (gamma in (0, 1); default
  0.5): the paper's stochastic projection rule ("stochastic multiplicative") as a public
  reimplementation reads it (a numpy one citing the paper, with gamma = 0.5 and u drawn on
  [gamma, 1 / gamma]); its optional random sign flip is not implemented (that reimplementation
  reports it diverging). ~, not re-verified against the paper's text.
* ``none``: w.

:func:`stochastic_mixture` (our option, the quantizer's ``mixture``): a projection applied to
a layer with probability p per training step (``granularity='layer'``) or to each weight
independently (``'weight'``), the identity otherwise.

Effective bits per weight (:func:`effective_bits`): what one distorted weight still carries.
Discrete projections: the entropy of the codes drawn (<= 1 bit for binarization, <= log2 k
for k levels: the entropy-coded size). Noise: the capacity of the Gaussian channel w -> w +
noise, 0.5 log2(1 + Var(w) / E[noise^2]) (Shannon; exact mutual information for Gaussian
weights, an upper bound otherwise); ``add_noise``: 0.5 log2(1 + 1 / sigma^2), so 0.68 bits is
sigma = 0.80; ``stochastic_multiply``: signal E[u] w, noise (u - E[u]) w. The paper reports 0.68 effective bits per weight at 11% CIFAR-10 test error
(abstract, verified); that it computes the bits from the SNR of additive noise this way is our
reading (~, not re-verified). Continuous deterministic projections (``none``, ``clip``,
``power``) keep float weights: 32 bits.
"""

from __future__ import annotations

import math

import torch

from qtrain.quant.binary import binary_sign
from qtrain.quant.rounding import check_rounding, round_values
from qtrain.quant.size import entropy_bits

PROJECTIONS = ("none", "binary", "stochastic_binary", "kquant", "power", "clip",
               "mult_noise", "add_noise", "stochastic_multiply")
STOCHASTIC = ("stochastic_binary", "mult_noise", "add_noise", "stochastic_multiply")
SCALES = ("max_abs", "mean_abs", "none")
GRANULARITIES = ("layer", "weight")
FLOAT_BITS = 32.0


def layer_scale(w: torch.Tensor, scale: str = "max_abs") -> torch.Tensor:
    """alpha_k of the layer (a 0-d tensor, detached; 1 for an all-zero layer)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; allowed: {SCALES}")
    if scale == "none":
        return torch.ones((), dtype=w.dtype, device=w.device)
    a = w.detach().abs()
    alpha = a.max() if scale == "max_abs" else a.mean()
    return torch.where(alpha > 0, alpha, torch.ones_like(alpha))


def _normal(w, generator):
    return torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)


def binarize(w: torch.Tensor, alpha) -> torch.Tensor:
    """alpha * sign(w), sign(0) = +1."""
    return alpha * binary_sign(w)


def stochastic_binarize_prob(w: torch.Tensor, alpha) -> torch.Tensor:
    """P(+alpha) = hard_sigmoid(w / alpha) = clip((w / alpha + 1) / 2, 0, 1)."""
    return ((w / alpha + 1) / 2).clamp(0, 1)


def stochastic_binarize(w: torch.Tensor, alpha, generator=None) -> torch.Tensor:
    """+alpha with probability :func:`stochastic_binarize_prob`, else -alpha."""
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    return alpha * torch.where(u < stochastic_binarize_prob(w, alpha), 1.0, -1.0).to(w.dtype)


def kquant_codes(w: torch.Tensor, alpha, levels: int, rounding: str = "nearest",
                 generator=None) -> torch.Tensor:
    """Level index j in 0..levels-1 (float tensor) of each weight."""
    check_levels(levels)
    check_rounding(rounding)
    t = ((w / alpha).clamp(-1, 1) + 1) * ((levels - 1) / 2)
    return round_values(t, rounding, generator).clamp(0, levels - 1)


def kquant_values(codes: torch.Tensor, alpha, levels: int) -> torch.Tensor:
    return alpha * (codes * (2.0 / (levels - 1)) - 1)


def kquant(w: torch.Tensor, alpha, levels: int, rounding: str = "nearest",
           generator=None) -> torch.Tensor:
    """k uniform levels on [-alpha, alpha] (module docstring)."""
    return kquant_values(kquant_codes(w, alpha, levels, rounding, generator), alpha, levels)


def power(w: torch.Tensor, alpha, beta: float) -> torch.Tensor:
    """alpha * sign(u) |clip(u, -1, 1)|^beta, u = w / alpha."""
    if not beta >= 0:
        raise ValueError(f"beta={beta}; allowed: >= 0")
    u = (w / alpha).clamp(-1, 1)
    mag = u.abs() ** beta if beta > 0 else torch.ones_like(u)
    sign = binary_sign(u) if beta == 0 else torch.sign(u)
    return alpha * sign * mag


def clip(w: torch.Tensor, c: float) -> torch.Tensor:
    if not c > 0:
        raise ValueError(f"clip={c}; allowed: > 0")
    return w.clamp(-c, c)


def mult_noise(w: torch.Tensor, sigma: float, generator=None) -> torch.Tensor:
    """w (1 + sigma n), n ~ N(0, 1)."""
    return w * (1 + sigma * _normal(w, generator))


def add_noise(w: torch.Tensor, sigma: float, generator=None) -> torch.Tensor:
    """w + sigma std(w) n, n ~ N(0, 1) (std over the layer, detached)."""
    std = w.detach().std() if w.numel() > 1 else w.detach().abs().mean()
    return w + sigma * std * _normal(w, generator)


def check_gamma(gamma) -> float:
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma={gamma}; allowed: 0 < gamma < 1")
    return gamma


def stochastic_multiply(w: torch.Tensor, gamma: float = 0.5, generator=None) -> torch.Tensor:
    """w u, u ~ U[gamma, 1 / gamma] per weight."""
    check_gamma(gamma)
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    return w * (gamma + (1.0 / gamma - gamma) * u)


def uniform_factor_moments(gamma: float) -> tuple[float, float]:
    """(E[u], Var[u]) of u ~ U[gamma, 1 / gamma]."""
    lo, hi = gamma, 1.0 / gamma
    return (lo + hi) / 2, (hi - lo) ** 2 / 12


def check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels={levels!r}; allowed: an int >= 2")
    return levels


def project(w: torch.Tensor, projection: str, *, scale: str = "max_abs", levels: int = 3,
            beta: float = 0.5, clip_value: float = 1.0, sigma: float = 0.5,
            gamma: float = 0.5, rounding: str = "nearest", generator=None) -> torch.Tensor:
    """``projection`` of ``w`` (values only, no gradient rule: see the quantizer)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection={projection!r}; allowed: {PROJECTIONS}")
    if projection == "none":
        return w
    if projection == "clip":
        return clip(w, clip_value)
    if projection == "mult_noise":
        return mult_noise(w, sigma, generator)
    if projection == "add_noise":
        return add_noise(w, sigma, generator)
    if projection == "stochastic_multiply":
        return stochastic_multiply(w, gamma, generator)
    alpha = layer_scale(w, scale)
    if projection == "binary":
        return binarize(w, alpha)
    if projection == "stochastic_binary":
        return stochastic_binarize(w, alpha, generator)
    if projection == "kquant":
        return kquant(w, alpha, levels, rounding, generator)
    return power(w, alpha, beta)


def stochastic_mixture(w: torch.Tensor, projected: torch.Tensor, p: float,
                       granularity: str = "layer", generator=None) -> torch.Tensor:
    """``projected`` with probability ``p`` (once for the whole layer, or per weight), ``w``
    otherwise: the stochastic projection rule."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p}; allowed: [0, 1]")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; allowed: {GRANULARITIES}")
    shape = () if granularity == "layer" else w.shape
    u = torch.rand(shape, generator=generator, device=w.device)
    return torch.where(u < p, projected, w)


def gaussian_channel_bits(signal_var: float, noise_var: float) -> float:
    """0.5 log2(1 + signal_var / noise_var) (inf without noise)."""
    if noise_var <= 0:
        return math.inf
    return 0.5 * math.log2(1.0 + signal_var / noise_var)


def effective_bits(w: torch.Tensor, projection: str, *, scale: str = "max_abs",
                   levels: int = 3, sigma: float = 0.5, gamma: float = 0.5,
                   rounding: str = "nearest", generator=None,
                   codes: torch.Tensor | None = None) -> float:
    """Effective bits per weight of ``w`` under ``projection`` (module docstring). ``codes``:
    the drawn codes of a discrete projection (drawn here from ``generator`` if not given)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection={projection!r}; allowed: {PROJECTIONS}")
    w = w.detach().double()
    n = w.numel()
    if projection in ("binary", "stochastic_binary", "kquant"):
        if codes is None:
            alpha = layer_scale(w, scale)
            if projection == "binary":
                codes = (w >= 0).long()
            elif projection == "stochastic_binary":
                codes = (stochastic_binarize(w, alpha, generator) > 0).long()
            else:
                codes = kquant_codes(w, alpha, levels, rounding, generator).long()
        return entropy_bits(codes) / n
    if projection == "add_noise":
        return min(FLOAT_BITS, gaussian_channel_bits(1.0, sigma**2))
    if projection == "mult_noise":
        var, power_ = float(w.var(unbiased=False)), float((w**2).mean())
        return min(FLOAT_BITS, gaussian_channel_bits(var, sigma**2 * power_))
    if projection == "stochastic_multiply":
        mean_u, var_u = uniform_factor_moments(check_gamma(gamma))
        var, power_ = float(w.var(unbiased=False)), float((w**2).mean())
        return min(FLOAT_BITS, gaussian_channel_bits(mean_u**2 * var, var_u * power_))
    return FLOAT_BITS
