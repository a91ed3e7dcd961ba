"""Gupta et al. 2015 fixed-point training, layer side: fixed-point layer inputs in the forward
and a fixed-point *error* in the backward.

Gupta, Agrawal, Gopalakrishnan & Narayanan 2015, "Deep Learning with Limited Numerical
Precision" (ICML), Sec. 3-4: the values computed in forward *and* back propagation are held
in the static fixed-point format <IL, FL> (:mod:`qtrain.quant.fixed_point`), converted with
round-to-nearest (eq. 1) or stochastic rounding (eq. 2) and saturated to the range (eq. 3).

:class:`FixedPointTrainingQuantizer` fills the activation slot of a fake-quant layer
(:mod:`qtrain.nn.fake_quant`):

* forward: the layer input x -> Convert(x, <bits - frac_bits, frac_bits>) (as
  :class:`qtrain.nn.format_quantizers.FixedPointQuantizer`, clipped straight-through);
* backward: the layer calls :meth:`quantize_output_grad` on its output, so the gradient of
  the layer's output (the error entering both backward GEMMs, dX = dY W and dW = dY^T X) is
  Convert(dY, <grad_bits - grad_frac_bits, grad_frac_bits>) with ``grad_rounding``.

The weights themselves are stored in fixed point by
:class:`qtrain.callbacks.fixed_point_weights.FixedPointWeightStorage` (the update is rounded
into the fixed-point weight: no FP32 master copy). The GEMM outputs are accumulated in FP32
and converted once (the paper's MACC, Sec. 3: sum in high precision, then Convert).
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.nn.format_quantizers import FixedPointQuantizer
from qtrain.quant.fixed_point import check_fixed_format, fake_fixed
from qtrain.quant.rounding import check_rounding, round_values


class _FixedErrorFn(torch.autograd.Function):
    """Identity forward; the gradient rounded to <IL, FL> (saturating) in the backward."""

    @staticmethod
    def forward(ctx, y, int_bits, frac_bits, rounding, gen):
        ctx.args = (int_bits, frac_bits, rounding, gen)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        il, fl, rounding, gen = ctx.args
        return fixed_error(g, il, fl, rounding, gen), None, None, None, None


def fixed_error(g: torch.Tensor, int_bits: int, frac_bits: int, rounding: str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Convert(g, <IL, FL>) without autograd: eps * round(g / eps) clamped to the range."""
    eps = 2.0 ** -frac_bits
    lo, hi = -(2.0 ** (int_bits - 1)), 2.0 ** (int_bits - 1) - eps
    return (round_values(g / eps, rounding, generator) * eps).clamp(lo, hi)


class FixedPointTrainingQuantizer(FixedPointQuantizer):
    """Fixed-point layer input (forward) and fixed-point error (backward), Gupta 2015.

    Args:
        bits / frac_bits / rounding / seed: the forward format <bits - frac_bits, frac_bits>
            and rounding, as :class:`FixedPointQuantizer`.
        grad_bits / grad_frac_bits: the error's word length and FL (None: no error
            rounding, the backward stays float).
        grad_rounding: 'stochastic' (eq. 2) | 'nearest' (eq. 1) | 'truncate'.
    The error generator is seeded with ``seed + 1`` (None: the global RNG).
    """

    def __init__(self, bits: int = 16, frac_bits: int = 12, rounding: str = "stochastic",
                 seed: int | None = None, grad_bits: int | None = 16,
                 grad_frac_bits: int | None = 14, grad_rounding: str = "stochastic") -> None:
        super().__init__(bits, frac_bits, rounding, seed)
        if (grad_bits is None) != (grad_frac_bits is None):
            raise ConfigError(f"FixedPointTrainingQuantizer: grad_bits={grad_bits!r} and "
                              f"grad_frac_bits={grad_frac_bits!r}: set both or neither")
        if grad_bits is not None:
            if not isinstance(grad_bits, int) or isinstance(grad_bits, bool):
                raise ConfigError(f"FixedPointTrainingQuantizer: grad_bits={grad_bits!r} must be an int")
            check_fixed_format(grad_bits - grad_frac_bits, grad_frac_bits,
                               "FixedPointTrainingQuantizer grad format (grad_bits - grad_frac_bits, "
                               "grad_frac_bits)")
        try:
            self.grad_rounding = check_rounding(grad_rounding, "grad_rounding")
        except ValueError as e:
            raise ConfigError(f"FixedPointTrainingQuantizer: {e}") from None
        self.grad_bits, self.grad_frac_bits = grad_bits, grad_frac_bits
        self._grad_generators: dict[str, torch.Generator] = {}

    def grad_generator(self, device) -> torch.Generator | None:
        if self.grad_rounding != "stochastic" or self.seed is None:
            return None
        key = str(device)
        if key not in self._grad_generators:
            self._grad_generators[key] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._grad_generators[key]

    def quantize_output_grad(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` unchanged; its gradient (the layer's error) in <grad IL, grad FL>."""
        if not self.enabled or self.grad_bits is None:
            return y
        return _FixedErrorFn.apply(y, self.grad_bits - self.grad_frac_bits, self.grad_frac_bits,
                                   self.grad_rounding, self.grad_generator(y.device))

    def quantize(self, x):
        return fake_fixed(x, self.int_bits, self.frac_bits, self.rounding, self.generator(x.device))

    def extra_repr(self):
        g = ("float" if self.grad_bits is None else
             f"<{self.grad_bits - self.grad_frac_bits}, {self.grad_frac_bits}> {self.grad_rounding}")
        return f"{super().extra_repr()}, error={g}"
