"""ELQ's trained binary / ternary weights as a fake-quant weight quantizer, and their packer.

:class:`ELQWeightQuantizer` holds the layer's alpha (the one ELQ solved, a buffer) and maps a
weight to ``alpha * nearest code`` (:func:`qtrain.quant.elq.nearest_codes`): a weight ELQ
already quantized (exactly ``alpha c``) maps to itself, bit for bit. Gradient: straight-through.
Storage: ``bits`` (1 binary, 2 ternary) per weight + one fp32 alpha per layer.

:func:`pack` writes it in the existing ``binary`` / ``ternary`` packed formats (alpha repeated
per row, stored as the export's ``scale_dtype``); registered in
:data:`qtrain.nn.packed_formats.PACKERS`.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import elq

SCALE_BITS = 32


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha, kind):
        return alpha * elq.nearest_codes(w, alpha, kind)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class ELQWeightQuantizer(Quantizer):
    """Args: bits: 1 (binary codes {-1, +1}) or 2 (ternary {-1, 0, +1}); alpha: the layer's
    scale (> 0)."""

    min_bits, max_bits = 1, 2

    def __init__(self, bits: int = 2, alpha: float = 1.0) -> None:
        super().__init__(bits)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def kind(self) -> str:
        return "binary" if self.bits == 1 else "ternary"

    def quantize(self, x):
        return _STE.apply(x, self.alpha.to(x.dtype), self.kind)

    def codes(self, weight):
        return elq.nearest_codes(weight.detach(), self.alpha, self.kind).to(torch.int32)

    def storage_bits(self, weight):
        return self.bits * weight.numel() + SCALE_BITS

    def extra_repr(self):
        return f"{super().extra_repr()}, kind={self.kind}, alpha={float(self.alpha):.6g}"


def pack(wq: ELQWeightQuantizer, w, flat, bias, backend, scale_dtype):
    """``alpha * c`` in the binary (sign bits) or ternary (codes) packed format."""
    from qtrain.nn.packed import PackedLinear

    codes = wq.codes(flat).float()
    rows = wq.alpha.float().reshape(1, 1).expand(flat.shape[0], 1)
    tol = 1e-3 if scale_dtype == torch.float16 else 1e-6
    if wq.kind == "binary":
        return PackedLinear.from_binary(codes, rows, bias, backend, scale_dtype), tol
    return PackedLinear.from_ternary(codes, rows, bias, backend, scale_dtype), tol
