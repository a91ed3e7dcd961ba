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

Input scaling (XNOR-Net Sec. 3.2, eq. 11): a binary convolution approximates
I * W ~ (sign(I) (*) sign(W)) . K alpha, where A = sum_c |I_c| / c is the mean absolute input
over the input channels and K = A * k is A convolved with the box filter k (every entry
1 / (w h), the kernel's size) at the convolution's stride, padding and dilation: one beta per
output position (:func:`xnor_input_scale`). For a fully connected layer the "kernel" is the
whole input: K = mean |x| per sample (beta = ||X||_l1 / n, Sec. 3.2). For a grouped
convolution A and K are taken per group. K is differentiated as the function of I it is
(``scale_grad=False`` detaches it); BNN's plain sign is K = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def xnor_input_scale(
    x: torch.Tensor, kernel_size: tuple[int, int] | None = None, stride=1, padding=0,
    dilation=1, groups: int = 1, out_channels: int | None = None,
    padding_mode: str = "zeros", scale_grad: bool = True,
) -> torch.Tensor:
    """XNOR-Net eq. (11) K for input ``x`` (module doc), broadcastable against the output.

    Conv (``kernel_size`` given; ``x`` is (N, C, H, W)): K has shape (N, out_channels, H', W')
    for groups > 1, else (N, 1, H', W'). Linear (``kernel_size=None``): (..., 1).
    ``padding`` / ``padding_mode`` as the convolution's (zero padding adds |0| to the box).
    """
    a = x.abs() if scale_grad else x.detach().abs()
    if kernel_size is None:
        return a.mean(dim=-1, keepdim=True)
    n, c, h, w = a.shape
    a = a.reshape(n, groups, c // groups, h, w).mean(dim=2)  # A per group: (N, G, H, W)
    kh, kw = kernel_size
    box = torch.full((groups, 1, kh, kw), 1.0 / (kh * kw), dtype=a.dtype, device=a.device)
    if padding_mode != "zeros":
        pads = tuple(p for p in reversed(padding) for _ in range(2))
        a, padding = F.pad(a, pads, mode=padding_mode), 0
    k = F.conv2d(a, box, None, stride, padding, dilation, groups)
    if groups > 1:
        k = k.repeat_interleave(out_channels // groups, dim=1)
    return k
