"""Loss-aware binarization (LAB) of weights: Hou, Yao & Kwok 2017, "Loss-aware Binarization
of Deep Networks" (ICLR 2017).

LAB takes a proximal Newton step on the loss with the constraint "weights of layer l are
alpha_l * b_l, b_l in {-1, +1}^n", using a diagonal Hessian approximation D_l = diag(d_l).
Its closed-form solution (Proposition 3.1 / Algorithm 1 of the paper) is

    W_hat_l = alpha_l * sign(w_l),   alpha_l = ||d_l (.) w_l||_1 / ||d_l||_1,

i.e. the d-weighted best scale: alpha_l minimises sum_i d_i (w_i - alpha sign(w_i))^2.
The curvature ``d`` is Adam's denominator ``sqrt(v_hat) + eps`` (second-moment estimate
``v`` with Adam's bias correction ``v_hat = v / (1 - beta2^t)``); the paper's extra factor
1/eta cancels in the ratio. The full-precision weights ``w`` are kept, updated with the
gradient taken at ``W_hat`` (straight-through) and clipped to [-1, 1] after every step.

This module holds the math (:func:`lab_alpha`, :func:`lab_binarize`) and the quantizer
module; :class:`qtrain.callbacks.lab.LABCallback` reads Adam's state after each optimizer
step, stores it here with :meth:`LABWeightQuantizer.set_curvature` and clips the weights.

Conventions / simplifications (stated, not hidden):

* one alpha per layer (the paper's per-layer scale; XNOR-Net uses one per output channel),
* before the first Adam step there is no second moment: ``d`` is the constant 1 (the
  buffer starts as the scalar 1), so ``alpha = mean|w|`` -- BinaryConnect/XNOR's scale,
  and exactly what Adam's state gives at that point anyway (v = 0 -> d = eps, constant),
* gradient: ``dL/dw = dL/dW_hat`` (identity straight-through, alpha and d treated as
  constants, as the paper applies the gradient at W_hat to the float weights; inside the
  [-1, 1] box kept by the clipping it equals BNN's clipped STE),
* sign(0) := +1 (two-valued codes, as :func:`qtrain.quant.binary.binary_sign`),
* weights only: LAB2 (binarized activations too) is LAB + a sign activation quantizer
  (``quant.act``); the paper's input rescaling by alpha is folded into W_hat.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant.binary import binary_sign

SCALE_BITS = 32  # one fp32 alpha per layer


def lab_alpha(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """alpha = ||d (.) w||_1 / ||d||_1 (Hou et al. 2017, Prop. 3.1), ``d`` > 0 broadcast
    against ``w`` (a scalar ``d`` gives mean|w|). Returns a 0-dim tensor, no gradient."""
    w = w.detach()
    d = d.detach().to(w.dtype).expand_as(w)
    return (d * w.abs()).sum() / d.sum()


def lab_binarize(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """alpha * sign(w) in the forward; identity gradient to ``w`` (straight-through)."""
    w_hat = lab_alpha(w, d) * binary_sign(w.detach())
    return w + (w_hat - w).detach()


class LABWeightQuantizer(Quantizer):
    """LAB binary weights ``alpha * sign(W)`` with the per-layer loss-aware alpha.

    Args:
        bits: must be 1.
    Buffers:
        d: the curvature (Adam's ``sqrt(v_hat) + eps``), shaped like the weight once
            :meth:`set_curvature` has run; the scalar 1 before that (alpha = mean|W|).
            Persistent, so a checkpoint/state dict reproduces the trained binary weights.
    Storage: 1 bit per weight + one fp32 alpha per layer.
    """

    min_bits = max_bits = 1

    def __init__(self, bits: int = 1) -> None:
        super().__init__(bits)
        self.register_buffer("d", torch.ones(()))

    @torch.no_grad()
    def set_curvature(self, d: torch.Tensor) -> None:
        """Store the diagonal curvature ``d`` (> 0, the weight's shape or a scalar)."""
        d = d.detach()
        if d.dim() and self.d.shape == d.shape:
            self.d.copy_(d)
        else:
            self.d = d.clone()

    def _check_shape(self, weight: torch.Tensor) -> None:
        if self.d.dim() and self.d.shape != weight.shape:
            raise ValueError(f"LABWeightQuantizer: curvature d has shape {tuple(self.d.shape)}, "
                             f"the weight {tuple(weight.shape)}; they must be equal")

    def alpha(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's current scale (what the forward uses, and what export stores)."""
        self._check_shape(weight)
        return lab_alpha(weight, self.d)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        return lab_binarize(x, self.d)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight >= 0).to(torch.int32)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return weight.numel() + SCALE_BITS

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # d is a scalar until the first optimizer step, weight-shaped after: take the saved
        # shape (resume / snapshot restore into a freshly converted model)
        saved = state_dict.get(prefix + "d")
        if saved is not None and saved.shape != self.d.shape:
            self.d = torch.empty_like(saved, device=self.d.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
