"""Bucketed min-max uniform weight quantizer for Polino et al. 2018 quantized distillation.

Quantized distillation (Polino 2018, sec. 2.1 / Algorithm 1) = QAT with this quantizer in the
weight slot of the fake-quant layers (forward and backward through the quantized weights,
update of the float copy via the straight-through gradient) plus the distillation loss of
:class:`qtrain.callbacks.distillation.DistillationCallback` (``loss='polino'``).
Math: :mod:`qtrain.quant.bucketed`.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import bucketed as B
from qtrain.quant.rounding import check_rounding


class BucketUniformQuantizer(Quantizer):
    """Args:
        bits: 1..16 (2^bits points per bucket).
        bucket_size: elements per bucket (paper: 256).
        rounding: 'nearest' | 'stochastic'.
        seed: generator seed for stochastic rounding (None: global RNG).
    Storage: ``bits`` per element + fp32 alpha and beta per bucket.
    """

    min_bits, max_bits = B.MIN_BITS, B.MAX_BITS

    def __init__(self, bits: int = 4, bucket_size: int = 256, rounding: str = "nearest",
                 seed: int | None = None) -> None:
        super().__init__(bits)
        B.check_bucket_args(bits, bucket_size)
        if rounding not in ("nearest", "stochastic"):
            check_rounding(rounding)
            raise ValueError(f"BucketUniformQuantizer: rounding={rounding!r}; allowed: nearest, stochastic")
        self.bucket_size, self.rounding, self.seed = bucket_size, rounding, seed
        self._gen: dict[str, torch.Generator] = {}

    def _generator(self, device) -> torch.Generator | None:
        if self.rounding != "stochastic" or self.seed is None:
            return None
        key = str(device)
        if key not in self._gen:
            self._gen[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen[key]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return B.fake_bucket_quantize(x, self.bits, self.bucket_size, self.rounding,
                                      self._generator(x.device))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + 64 * B.num_buckets(weight.numel(), self.bucket_size)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bucket_size={self.bucket_size}, rounding={self.rounding}, enabled={self.enabled}"
