"""Uniform fake-quantizer modules for weights and activations (Jacob et al. 2018 QAT).

Weights: ranges from the current weight's min/max every forward (per tensor, per output
channel, or per group of ``group_size`` input elements). Activations: ranges tracked by an
exponential moving average of batch min/max during training (Jacob 2018, sec. 3.1) and
frozen in eval mode. Math in :mod:`qtrain.quant.uniform`.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import uniform as U

GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "ema")


class UniformQuantizer(Quantizer):
    """Fake-quantize to a uniform ``bits``-bit grid with the clipped STE.

    Args:
        bits: 1..8 (symmetric needs >= 2).
        symmetric: signed codes with zero-point 0, else unsigned affine codes.
        granularity: 'tensor', 'channel' (along ``axis``) or 'group' (``group_size`` along
            the flattened input dimension of a weight).
        observer: 'minmax' (range of the current tensor: weights) or 'ema' (moving average
            of batch ranges in training, frozen in eval: activations).
        ema_decay: weight of the old range in the EMA update.
    """

    min_bits, max_bits = U.MIN_BITS, U.MAX_BITS

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        granularity: str = "tensor",
        group_size: int | None = None,
        axis: int = 0,
        observer: str = "minmax",
        ema_decay: float = 0.9,
    ) -> None:
        super().__init__(bits)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; allowed: {GRANULARITIES}")
        if observer not in OBSERVERS:
            raise ValueError(f"observer={observer!r}; allowed: {OBSERVERS}")
        if observer == "ema" and granularity != "tensor":
            raise ValueError("observer='ema' (activations) supports granularity='tensor' only")
        if granularity == "group" and not group_size:
            raise ValueError("granularity='group' needs group_size (e.g. 32, 64, 128)")
        U.code_range(bits, symmetric)  # validates bits for this mode
        self.symmetric = symmetric
        self.granularity = granularity
        self.group_size = group_size
        self.axis = axis
        self.observer = observer
        self.ema_decay = ema_decay
        self.register_buffer("running_min", torch.tensor(0.0))
        self.register_buffer("running_max", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    def set_bits(self, bits: int) -> None:
        U.code_range(bits, self.symmetric)
        super().set_bits(bits)

    def _ema_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training or not bool(self.initialized):
            lo, hi = torch.aminmax(x.detach())  # one pass
            if bool(self.initialized):
                d = self.ema_decay
                lo = d * self.running_min + (1 - d) * lo
                hi = d * self.running_max + (1 - d) * hi
            with torch.no_grad():
                self.running_min.copy_(lo)
                self.running_max.copy_(hi)
                self.initialized.fill_(True)
        return self.running_min, self.running_max

    def qparams(self, x: torch.Tensor) -> U.QParams:
        if self.observer == "ema":
            lo, hi = self._ema_range(x)
        else:
            lo, hi = U.reduce_range(x.detach(), self.granularity, self.axis, self.group_size)
        return U.qparams_from_range(lo, hi, self.bits, self.symmetric)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.qparams(x)
        if self.granularity == "group":
            return U.fake_quantize(U.grouped(x, self.group_size), qp).reshape(x.shape)
        return U.fake_quantize(x, qp)

    def _n_params(self, weight: torch.Tensor) -> int:
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return weight.shape[self.axis]
        return weight.numel() // self.group_size

    def storage_bits(self, weight: torch.Tensor) -> int:
        return U.storage_bits(weight.numel(), self.bits, self._n_params(weight), self.symmetric)

    @torch.no_grad()
    def export_qparams(self, weight: torch.Tensor) -> dict:
        """Integer codes and parameters of ``weight`` for packing (qtrain.export).

        Returns dict(codes=int32 tensor shaped like the (grouped) weight, scale, zero_point
        (broadcastable to codes), bits, symmetric, granularity, group_size).
        """
        qp = self.qparams(weight)
        w = U.grouped(weight, self.group_size) if self.granularity == "group" else weight
        codes = U.quantize(w, qp).to(torch.int32)
        return dict(
            codes=codes.reshape(weight.shape) if self.granularity != "group" else codes,
            scale=qp.scale,
            zero_point=qp.zero_point.to(torch.int32),
            bits=self.bits,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=self.group_size,
        )

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}, "
            f"group_size={self.group_size}, observer={self.observer}, enabled={self.enabled}"
        )
