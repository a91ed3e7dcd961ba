"""Uniform fake-quantizer modules for weights and activations (Jacob et al. 2018 QAT).

Weights: ranges from the current weight's min/max every forward (per tensor, per output
channel, or per group of ``group_size`` input elements). Activations: ranges tracked by an
exponential moving average of batch min/max during training and frozen in eval mode (Jacob
2018, sec. 3.1: "EMA with the smoothing parameter being close to 1 so that observed ranges
are smoothed across thousands of training steps"). As TensorFlow's quantize rewriter
(``MovingAvgQuantize``: ``ema_decay=0.999``, ``assign_moving_average`` with its default
``zero_debias=True``), the default decay is d = 0.999 and the average is debiased:

    b_t = d b_(t-1) + (1 - d) r_t,  b_0 = 0;   range_t = b_t / (1 - d^t)

so the first batch's range is range_1 (no constant initial value to forget), a short run
averages all its batches almost evenly, and a long run is the plain EMA. While the
quantizer is disabled in training (the float phase, ``quant.start_epoch``) the EMA keeps
collecting ranges, as Jacob et al. disable activation quantization "at the start of
training" while ranges are collected (TF's ``quant_delay``). Math in
:mod:`qtrain.quant.uniform`.
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
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
        ema_decay: d, the weight of the old range in the debiased EMA (module docstring);
            0.999 as Jacob et al. / TensorFlow.
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
        ema_decay: float = 0.999,
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
        if not 0 < ema_decay < 1:
            raise ConfigError(f"quant.act.ema_decay={ema_decay}; allowed: 0 < ema_decay < 1 "
                              "(Jacob et al. 2018 / TensorFlow: 0.999)")
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
        self.register_buffer("ema_steps", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "ema_steps"
        if key not in state_dict and prefix + "initialized" in state_dict:
            # a state saved before the debiased EMA: its range is an old plain EMA, kept as
            # is (a large step count makes the debias factor 1)
            state_dict[key] = torch.tensor(
                10**6 if bool(state_dict[prefix + "initialized"]) else 0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_bits(self, bits: int) -> None:
        U.code_range(bits, self.symmetric)
        super().set_bits(bits)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor) -> None:
        """range_t = b_t / (1 - d^t) with b_t = d b_(t-1) + (1 - d) r_t, written on the
        debiased range itself: range_t = c range_(t-1) + (1 - c) r_t,
        c = d (1 - d^(t-1)) / (1 - d^t) (c = 0 at t = 1: the first batch's range)."""
        lo, hi = torch.aminmax(x.detach())  # one pass
        d, t = self.ema_decay, int(self.ema_steps) + 1
        c = d * (1 - d ** (t - 1)) / (1 - d**t)
        self.running_min.mul_(c).add_((1 - c) * lo.to(self.running_min.dtype))
        self.running_max.mul_(c).add_((1 - c) * hi.to(self.running_max.dtype))
        self.ema_steps.fill_(t)
        self.initialized.fill_(True)

    def _ema_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training or not bool(self.initialized):
            self._ema_update(x)
        return self.running_min, self.running_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            if self.observer == "ema" and self.training:
                self._ema_update(x)  # ranges collected while quantization is disabled
            return x
        return self.quantize(x)

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
