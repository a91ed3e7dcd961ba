"""The quantizer module interface every format implements.

A *quantizer* maps a float tensor to its fake-quantized value (same shape, same dtype) in
``forward``; its gradient is the method's estimator (STE, PACT, LSQ, ...). The pure tensor
math lives in :mod:`qtrain.quant`; a quantizer module holds the data (bits, learned scales,
observer statistics) and calls that math. Fake-quant layers (:mod:`qtrain.nn.fake_quant`)
own one quantizer for the weight and one for the input activation.

Conventions (every subclass):

* ``__init__(self, bits: int, **options)`` -- ``bits`` first, so configs can build
  quantizers as ``_partial_`` objects and the conversion code fills in per-layer bits;
  an unsupported bit width raises ``ValueError`` naming the allowed range.
* ``forward(x)`` never modifies ``x`` in place (the float master weight stays intact).
* ``enabled``: when False, ``forward`` returns ``x`` unchanged (the FP32 phase of a run).
* ``storage_bits(weight)``: exact number of bits needed to store ``weight`` in this format
  (codes + scales/zero-points/codebooks), used for the run's size report.
* ``set_bits(bits)``: change the bit width (HAWQ / Q-BERT bit allocation).
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.errors import ConfigError


class Quantizer(nn.Module):
    """Base class: identity quantizer that stores everything in fp32 (32 bits/element)."""

    #: inclusive range of supported bit widths; subclasses override
    min_bits: int = 1
    max_bits: int = 32

    def __init__(self, bits: int = 32) -> None:
        super().__init__()
        self.bits = self._check_bits(bits)
        self.enabled = True

    def _check_bits(self, bits: int) -> int:
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise ConfigError(f"{type(self).__name__}: bits must be an int, got {bits!r}")
        if not self.min_bits <= bits <= self.max_bits:
            raise ConfigError(
                f"{type(self).__name__}: bits={bits} is not supported; "
                f"allowed: {self.min_bits}..{self.max_bits}"
            )
        return bits

    def set_bits(self, bits: int) -> None:
        self.bits = self._check_bits(bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # overridden by every format
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.quantize(x)

    def storage_bits(self, weight: torch.Tensor) -> int:
        """Bits needed to store ``weight`` in this format (base: fp32 elements)."""
        return 32 * weight.numel()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"
