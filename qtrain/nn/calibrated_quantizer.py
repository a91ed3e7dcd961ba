"""Uniform quantizers whose range comes from a calibrator (PTQ) or is tracked (QAT), and
the value-aware quantizer (Park 2018).

PTQ flow with :class:`CalibratedQuantizer` (per-tensor, e.g. activations)::

    for q in quantizers: q.calibrating = True       # forward passes collect statistics,
    for x, _ in calib_loader: model(x)              #   outputs stay float
    for q in quantizers: q.freeze()                 # range from the observer -> scale/zp
    # from now on forward fake-quantizes with the frozen range (saved in state_dict)

Grid convention (:func:`qtrain.quant.uniform.qparams_from_clip`): the calibrated clip value
alpha is the grid's end level, so ``q(alpha) == alpha``: symmetric S = alpha / (2^(b-1) - 1)
(NVIDIA / TensorRT), affine on a non-negative stream S = alpha / (2^b - 1), Z = 0. (The
observer convention of :func:`~qtrain.quant.uniform.qparams_from_range`, S = alpha /
(2^(b-1) - 0.5), would clip a 4-bit KL / ACIQ / percentile threshold at 0.93 alpha.)

QAT range tracking: leave ``calibrating`` False and do not freeze; in training mode every
forward updates the observer (use ``calibration='ema'`` or 'minmax') and quantizes with its
current range; in eval mode the last range is used.
"""

from __future__ import annotations

import torch

from qtrain.nn.observers import Observer, make_observer
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import uniform as U
from qtrain.quant import value_aware as VA


class CalibratedQuantizer(Quantizer):
    """Uniform ``bits``-bit per-tensor fake-quant with a calibrated clip range.

    Args:
        bits: 1..8 (symmetric needs >= 2).
        calibration: an :class:`Observer`, or a name for :func:`make_observer`
            ('minmax', 'ema', 'percentile', 'mse', 'kl', 'aciq', 'aciq-gaussian').
        symmetric: signed codes, zero-point 0; else unsigned affine.
        name: layer name used in error messages.
        observer_kwargs: forwarded to :func:`make_observer`.
    Storage: ``bits`` per element + fp32 scale (+ ``bits``-bit zero-point if affine).
    """

    min_bits, max_bits = U.MIN_BITS, U.MAX_BITS

    def __init__(self, bits: int = 8, calibration: str | Observer = "minmax",
                 symmetric: bool = True, name: str = "CalibratedQuantizer",
                 **observer_kwargs) -> None:
        super().__init__(bits)
        U.code_range(bits, symmetric)
        self.symmetric = symmetric
        self.observer = (calibration if isinstance(calibration, Observer)
                         else make_observer(calibration, name=name, **observer_kwargs))
        self.calibrating = False
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("frozen", torch.tensor(False))

    def set_bits(self, bits: int) -> None:
        U.code_range(bits, self.symmetric)
        super().set_bits(bits)
        if bool(self.frozen):
            self.freeze()

    def _qparams_from_observer(self) -> U.QParams:
        lo, hi = self.observer.compute_range(self.bits, self.symmetric)
        return U.qparams_from_clip(lo, hi, self.bits, self.symmetric)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the range from the collected statistics and stop collecting."""
        qp = self._qparams_from_observer()
        self.scale.copy_(qp.scale)
        self.zero_point.copy_(qp.zero_point)
        self.frozen.fill_(True)
        self.calibrating = False

    def unfreeze(self) -> None:
        self.frozen.fill_(False)

    def qparams(self) -> U.QParams:
        qmin, qmax = U.code_range(self.bits, self.symmetric)
        return U.QParams(self.scale, self.zero_point, qmin, qmax)

    def quantize(self, x):
        if self.calibrating:
            self.observer.update(x)
            return x
        if bool(self.frozen):
            return U.fake_quantize(x, self.qparams())
        if self.training or int(self.observer.count) == 0:
            self.observer.update(x)
        qp = self._qparams_from_observer()
        with torch.no_grad():
            self.scale.copy_(qp.scale)
            self.zero_point.copy_(qp.zero_point)
        return U.fake_quantize(x, qp)

    def storage_bits(self, weight):
        return U.storage_bits(weight.numel(), self.bits, 1, self.symmetric)

    def extra_repr(self):
        return (f"bits={self.bits}, symmetric={self.symmetric}, "
                f"observer={type(self.observer).__name__}, frozen={bool(self.frozen)}")


class ValueAwareQuantizer(Quantizer):
    """Park 2018: keep the ``ratio`` largest-magnitude values in fp32, quantize the rest
    uniformly on the narrowed range (see :mod:`qtrain.quant.value_aware`).

    Storage: dense codes + (fp32 value + index) per outlier + scale (+ zero-point).
    """

    min_bits, max_bits = U.MIN_BITS, U.MAX_BITS

    def __init__(self, bits: int = 4, ratio: float = 0.01, symmetric: bool = True,
                 name: str = "ValueAwareQuantizer") -> None:
        super().__init__(bits)
        U.code_range(bits, symmetric)
        VA.outlier_count(100, ratio)  # validates ratio
        self.ratio, self.symmetric, self.name = ratio, symmetric, name

    def quantize(self, x):
        return VA.value_aware_fake_quantize(x, self.bits, self.ratio, self.symmetric, self.name)

    def storage_bits(self, weight):
        return VA.value_aware_storage_bits(weight.numel(), self.bits, self.ratio, self.symmetric)
