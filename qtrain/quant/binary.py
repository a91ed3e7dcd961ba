"""Binary weights and activations.

Weights: Rastegari et al. 2016, "XNOR-Net", Sec. 3.1, eq. (4): W ~ alpha * B with
B = sign(W) and alpha = mean(|W|) = ||W||_1 / n, here per output channel (dim 0).
Activations: Hubara / Courbariaux et al. 2016, "Binarized Neural Networks", eq. (1)-(4):
x_b = sign(x) with the clipped straight-through gradient 1_{|x| <= 1}.

sign(0) := +1 (two-valued codes). Gradient of the weight path: the sign uses the clipped
STE (1_{|w| <= 1}, XNOR-Net Sec. 3.1) and alpha is differentiated exactly (it is a function
of W), so dL/dW_i = alpha * g_i * 1_{|W_i|<=1} + sign(W_i)/n * sum_j g_j sign(W_j) per
channel (the second sign is d|W_i|/dW_i, 0 at W_i = 0) -- the chain rule applied to eq. (4); XNOR-Net's released code uses the same two
terms with the first one unclipped. ``scale_grad=False`` detaches alpha.
"""

from __future__ import annotations

import torch


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.abs() <= 1)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward, gradient 1_{|x| <= 1} (BNN's clipped STE)."""
    return _SignClippedSTE.apply(x)


def xnor_scale(w: torch.Tensor) -> torch.Tensor:
    """alpha = mean |W| per output channel (dim 0), shaped to broadcast against ``w``."""
    dims = tuple(range(1, w.dim()))
    if not dims:
        return w.abs().mean()
    return w.abs().mean(dim=dims, keepdim=True)


def xnor_binarize(w: torch.Tensor, scale_grad: bool = True) -> torch.Tensor:
    """alpha * sign(W) (XNOR-Net eq. 4) with the gradient described in the module doc."""
    alpha = xnor_scale(w if scale_grad else w.detach())
    return alpha * sign_ste(w)


def binarize_activation(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} with the clipped STE (BNN eq. 4)."""
    return sign_ste(x)
