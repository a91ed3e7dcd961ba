"""Ternary weights: TWN (Li & Liu 2016) and TTQ (Zhu et al. 2017).

TWN, "Ternary Weight Networks", eq. (8)-(9) (approximate solution):
    Delta = 0.7 * mean(|W|),   alpha = mean(|W_i| : |W_i| > Delta),
    W^ = alpha * sign(W) * 1_{|W| > Delta}
computed per tensor (the paper) or per output channel. Gradient: straight-through (the
full-precision weight receives dL/dW^, TWN Alg. 1).

TTQ, "Trained Ternary Quantization", eq. (5)-(8): threshold Delta = t * max|W| (t = 0.05),
    W^ = W_p if W > Delta;  0 if |W| <= Delta;  -W_n if W < -Delta,
with learned positive scales W_p, W_n. Gradients:
    dL/dW_p = sum_{i in I_p} g_i,   dL/dW_n = -sum_{i in I_n} g_i,
    dL/dW   = W_p g (I_p),  g (I_z),  W_n g (I_n).
The paper writes dL/dW_n without the minus sign; the minus is the chain rule of
W^ = -W_n (and what its TensorFlow implementation computes by autodiff). Simplification:
the paper rescales latent weights to [-1, 1] first; the threshold t*max|W| makes that
unnecessary for the forward, so we use W directly.
"""

from __future__ import annotations

import torch

TWN_DELTA_FACTOR = 0.7
TTQ_THRESHOLD = 0.05


def _reduce_dims(w: torch.Tensor, per_channel: bool):
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else tuple(range(w.dim()))


def twn_params(w: torch.Tensor, per_channel: bool = False, delta_factor: float = 0.7):
    """(Delta, alpha) of TWN eq. (8)-(9), broadcastable to ``w`` (no gradient)."""
    w = w.detach()
    dims = _reduce_dims(w, per_channel)
    a = w.abs()
    delta = delta_factor * a.mean(dim=dims, keepdim=True)
    mask = a > delta
    count = mask.sum(dim=dims, keepdim=True)
    alpha = (a * mask).sum(dim=dims, keepdim=True) / count.clamp_min(1)
    return delta, alpha


def twn_codes(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Ternary codes in {-1, 0, +1}."""
    return torch.sign(w) * (w.abs() > delta)


class _TWNSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, delta, alpha):
        return alpha * twn_codes(w, delta)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def twn_ternarize(
    w: torch.Tensor, per_channel: bool = False, delta_factor: float = TWN_DELTA_FACTOR
) -> torch.Tensor:
    delta, alpha = twn_params(w, per_channel, delta_factor)
    return _TWNSTE.apply(w, delta, alpha)


class _TTQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, w_p, w_n, t):
        delta = t * w.detach().abs().max()
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, w_p, w_n)
        return w_p * pos.to(w.dtype) - w_n * neg.to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        pos, neg, w_p, w_n = ctx.saved_tensors
        g_wp = (g * pos).sum().reshape(w_p.shape)
        g_wn = -(g * neg).sum().reshape(w_n.shape)
        g_w = torch.where(pos, w_p * g, torch.where(neg, w_n * g, g))
        return g_w, g_wp, g_wn, None


def ttq_ternarize(
    w: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, threshold: float = TTQ_THRESHOLD
) -> torch.Tensor:
    """TTQ forward/backward (module doc); ``w_p``, ``w_n`` are positive scalar tensors."""
    return _TTQ.apply(w, w_p, w_n, threshold)


def ttq_masks(w: torch.Tensor, threshold: float = TTQ_THRESHOLD):
    delta = threshold * w.detach().abs().max()
    return w > delta, w < -delta
