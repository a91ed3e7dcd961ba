"""ACIQ: analytical clipping for integer quantization (Banner et al. 2019, "Post training
4-bit quantization of convolutional networks for rapid-deployment", NeurIPS; arXiv 2018).

Expected MSE of clipping to [-alpha, alpha] and quantizing to 2^M uniform levels
(quantization noise Delta^2/12 with Delta = 2 alpha / 2^M, i.e. alpha^2 / (3 * 4^M)):

* Laplace(0, b), eq. (5):   E = 2 b^2 exp(-alpha / b) + alpha^2 / (3 * 4^M)
* Gaussian(0, s^2), eq. (7): E = (alpha^2 + s^2) [1 - erf(alpha / (sqrt(2) s))]
                                 - sqrt(2/pi) alpha s exp(-alpha^2 / (2 s^2)) + alpha^2/(3*4^M)

Optimality condition dE/dalpha = 0 (both left sides increase in alpha, one root):

* Laplace:  alpha / (3 * 4^M) = b exp(-alpha / b)
* Gaussian: alpha [1 - erf(alpha / (sqrt(2) s))] - sqrt(2/pi) s exp(-alpha^2/(2 s^2))
            + alpha / (3 * 4^M) = 0

solved by bisection in float64 (:func:`aciq_alpha`, in units of b or s). The paper's table
(Laplace: M=2 2.83b, 3 3.89b, 4 5.03b, 8 9.89b) is reproduced by the tests, not stored.
Fitting (:func:`aciq_range`): b = mean|x - mean(x)|, s = std(x); range mean +- alpha.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from qtrain.quant import uniform as U

DISTRIBUTIONS = ("laplace", "gaussian")


def laplace_mse(alpha: float, b: float, bits: int) -> float:
    return 2 * b * b * math.exp(-alpha / b) + alpha * alpha / (3 * 4**bits)


def gaussian_mse(alpha: float, s: float, bits: int) -> float:
    u = alpha / (math.sqrt(2) * s)
    return ((alpha * alpha + s * s) * math.erfc(u)
            - math.sqrt(2 / math.pi) * alpha * s * math.exp(-u * u) + alpha * alpha / (3 * 4**bits))


def _condition(alpha: float, bits: int, distribution: str) -> float:
    """dE/dalpha / 2 in units b = 1 or s = 1."""
    if distribution == "laplace":
        return alpha / (3 * 4**bits) - math.exp(-alpha)
    return (alpha * math.erfc(alpha / math.sqrt(2))
            - math.sqrt(2 / math.pi) * math.exp(-alpha * alpha / 2) + alpha / (3 * 4**bits))


@lru_cache(maxsize=None)
def aciq_alpha(bits: int, distribution: str = "laplace") -> float:
    """Optimal clip alpha* / b (Laplace) or alpha* / sigma (Gaussian) for ``bits`` bits."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"ACIQ: distribution={distribution!r}; allowed: {DISTRIBUTIONS}")
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"ACIQ: bits={bits!r} not supported; allowed 1..16")
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _condition(mid, bits, distribution) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def aciq_range(x: torch.Tensor, bits: int, distribution: str = "laplace", name: str = "tensor"):
    """(mean - alpha, mean + alpha) with alpha from the fitted Laplace b or Gaussian sigma."""
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor cannot be calibrated")
    U.check_finite(x, name)
    x = x.detach().double().flatten()
    mu = x.mean()
    spread = (x - mu).abs().mean() if distribution == "laplace" else x.std(unbiased=False)
    alpha = aciq_alpha(bits, distribution) * spread
    return (mu - alpha).float(), (mu + alpha).float()
