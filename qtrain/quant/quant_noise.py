"""Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for Extreme Model
Compression", sec. 4, eq. (5)-(6)): noise masks, the quantized values and the noisy
forward value.

During training a random subset J of the blocks of a weight W takes its quantized value
and the rest stays float: ``W_noise = W + M * (phi(W) - W)`` with ``M`` a 0/1 mask drawn
with rate ``p``; the gradient is straight-through (identity w.r.t. W).

Noise units:
* scalar (int8 / int4) noise: every *weight* is its own block, a Bernoulli(p) per weight
  (:func:`weight_mask`; fairseq's ``IntLinear``: ``mask.bernoulli_(1 - p)`` per element);
* PQ noise: blocks aligned with the PQ sub-vectors of :mod:`qtrain.quant.kmeans`
  (:func:`block_mask`; fairseq's ``quant_noise``):
  - Linear / Embedding (out, in): ``block_size`` consecutive input columns of a row;
  - Conv2d with kh*kw > 1: one whole kernel (out, in) -- block = kh*kw;
  - Conv2d 1x1: ``block_size`` consecutive input channels.

Quantized values phi(W):
* scalar: :func:`minmax_qparams` / :func:`fake_quant` -- the paper's sec. 3.1 min-max
  quantizer s = (max W - min W) / (2^N - 1), z = round(-min W / s), all 2^N codes
  (computed as PyTorch's ``MinMaxObserver``, which fairseq's ``emulate_int8_tensor``
  uses: the range is widened to contain 0, a no-op for weights that straddle 0);
  :func:`symmetric_channel_qparams` is the per-output-channel symmetric option;
* PQ: :func:`pq_nearest` -- every block's nearest codeword of its *current* value.

The "drop" variant (:func:`drop_noise`, fairseq's ``quant_noise``): the selected blocks
are zeroed and the rest rescaled by 1/(1-p) during training. fairseq writes that value
into the parameter (``mod.weight.data = ...``) every step, so dropped blocks stay zero and
the rescale compounds; here it is the forward value only and W is never modified.
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.quant import kmeans as KM
from qtrain.quant import uniform as U


def noise_block_size(weight: torch.Tensor, block_size: int, name: str = "weight") -> int:
    """Effective PQ block size: kh*kw for a conv with a spatial kernel, else ``block_size``."""
    if weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1:
        return weight.shape[2] * weight.shape[3]
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"{name}: block_size must be a positive int, got {block_size!r}")
    in_flat = weight[0].numel()
    if in_flat % block_size:
        raise ConfigError(
            f"{name}: block_size={block_size} does not divide the input dimension {in_flat} "
            f"of weight {tuple(weight.shape)}"
        )
    return block_size


def block_mask(weight: torch.Tensor, p: float, block_size: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """PQ noise: boolean mask shaped like ``weight``; each block is True with probability
    ``p`` (one uniform draw per block, row-major over (row, block))."""
    bs = noise_block_size(weight, block_size)
    n_rows, in_flat = weight.shape[0], weight[0].numel()
    draw = torch.rand((n_rows, in_flat // bs), generator=generator, device=weight.device)
    m = draw < p
    return m.unsqueeze(-1).expand(n_rows, in_flat // bs, bs).reshape(weight.shape)


def weight_mask(weight: torch.Tensor, p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Scalar noise: boolean mask shaped like ``weight``, a Bernoulli(p) per element (one
    uniform draw per weight, ``draw < p``)."""
    return torch.rand(weight.shape, generator=generator, device=weight.device) < p


# -- scalar quantizers ---------------------------------------------------------------------
def minmax_qparams(x: torch.Tensor, bits: int) -> U.QParams:
    """Per-tensor affine min-max parameters (Fan 2020 sec. 3.1): codes 0 .. 2^bits - 1,
    s = (max - min) / (2^bits - 1), z = round(-min / s) -- PyTorch ``MinMaxObserver``'s
    ``calculate_qparams`` with ``quant_min=0, quant_max=2^bits - 1`` (range widened to
    contain 0)."""
    lo, hi = torch.aminmax(x.detach().float())
    return U.qparams_from_range(lo, hi, bits, symmetric=False)


def symmetric_channel_qparams(w: torch.Tensor, bits: int) -> U.QParams:
    """Option: symmetric per-output-channel parameters for ``w`` viewed as (N, in_flat):
    s_n = max|w_n| / ((2^bits - 1) / 2), z = 0, codes -2^(bits-1) .. 2^(bits-1) - 1."""
    lo, hi = torch.aminmax(w.detach().reshape(w.shape[0], -1).float(), dim=1, keepdim=True)
    return U.qparams_from_range(lo, hi, bits, symmetric=True)


def int_codes(w2d: torch.Tensor, qp: U.QParams) -> torch.Tensor:
    """Integer codes (float tensor) ``clamp(round(w / s) + z, qmin, qmax)`` of (N, K) ``w2d``."""
    return U.quantize(w2d.detach().float(), qp)


def fake_quant(x: torch.Tensor, qp: U.QParams) -> torch.Tensor:
    """``(codes - z) * s`` without gradient (the value phi(x))."""
    return U.dequantize(int_codes(x, qp), qp).to(x.dtype)


# -- PQ ------------------------------------------------------------------------------------
def pq_nearest(w: torch.Tensor, centroids: torch.Tensor, block_size: int,
               name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword (squared Euclidean) of every block of the current ``w``.

    Returns (assignments (out * in_flat / bs,), reconstructed weight shaped like ``w``)."""
    blocks = KM.blocks_of(w.detach().float(), block_size, name)
    a, _ = KM.assign(blocks, centroids.float())
    return a, KM.pq_reconstruct(centroids, a, w.shape).to(w.dtype)


# -- noisy forward values ------------------------------------------------------------------
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


def drop_noise(weight: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """fairseq's "drop" PQ noise: ``0`` where ``mask``, ``weight / (1 - p)`` elsewhere.

    The gradient w.r.t. ``weight`` is the identity, as in fairseq, where the forward value
    *is* the parameter's data and the optimizer receives its gradient unchanged."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"quant_noise drop mode: p={p} must be in [0, 1)")
    value = weight.detach().masked_fill(mask, 0.0) * (1.0 / (1.0 - p))
    all_true = torch.ones((), dtype=torch.bool, device=weight.device).expand(weight.shape)
    return _NoiseSTE.apply(weight, value, all_true)
