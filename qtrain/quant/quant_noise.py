"""Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for Extreme Model
Compression", sec. 4, eq. (5)-(6)): block-wise noise masks and the noisy forward value.

During training a random subset of blocks of a weight W takes its quantized value and the
rest stays float: ``W_noise = W + M * (phi(W) - W)`` with ``M`` a block mask drawn with rate
``p`` (each block independently); the gradient is straight-through (identity w.r.t. W).

Blocks (aligned with the PQ sub-vectors of :mod:`qtrain.quant.kmeans`):
* Linear / Embedding (out, in): ``block_size`` consecutive input columns of a row;
* Conv2d with kh*kw > 1: one whole kernel (out, in) -- block = kh*kw;
* Conv2d 1x1: ``block_size`` consecutive input channels.

Unlike fairseq (which writes the noised weight back into the parameter), these functions
return a new tensor and never modify W. fairseq's "drop" variant (phi = 0 with a 1/(1-p)
rescale) is not implemented: the quantized value is what the paper's results use.
"""

from __future__ import annotations

import torch


def noise_block_size(weight: torch.Tensor, block_size: int, name: str = "weight") -> int:
    """Effective block size: kh*kw for a conv with a spatial kernel, else ``block_size``."""
    if weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1:
        return weight.shape[2] * weight.shape[3]
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
    in_flat = weight[0].numel()
    if in_flat % block_size:
        raise ValueError(
            f"{name}: block_size={block_size} does not divide the input dimension {in_flat} "
            f"of weight {tuple(weight.shape)}"
        )
    return block_size


def block_mask(weight: torch.Tensor, p: float, block_size: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask shaped like ``weight``: each block is True with probability ``p``."""
    bs = noise_block_size(weight, block_size)
    n_rows, in_flat = weight.shape[0], weight[0].numel()
    draw = torch.rand((n_rows, in_flat // bs), generator=generator, device=weight.device)
    m = draw < p
    return m.unsqueeze(-1).expand(n_rows, in_flat // bs, bs).reshape(weight.shape)


class _NoiseSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, quantized, mask):
        return torch.where(mask, quantized.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def apply_noise(weight: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor):
    """``weight`` where ``mask`` is False, ``quantized`` where True (exact values); the
    gradient w.r.t. ``weight`` is the identity everywhere (straight-through)."""
    return _NoiseSTE.apply(weight, quantized.detach(), mask)
