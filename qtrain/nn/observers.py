"""Observers: accumulate statistics of a tensor stream and turn them into a clip range.

Interface: ``update(x)`` (no gradient; raises ValueError naming ``name`` on NaN/inf),
``compute_range(bits, symmetric) -> (lo, hi)`` (0-dim tensors), ``reset()``. State lives in
buffers so calibration results travel in checkpoints. Used for PTQ calibration (run batches,
then freeze) and QAT range tracking (update every training step), see
:class:`qtrain.nn.calibrated_quantizer.CalibratedQuantizer`.

* :class:`MinMaxObserver`     running min/max, or an EMA of batch min/max for QAT (Jacob et
  al. 2018 Sec. 3.1, smoothing "close to 1"): ``momentum`` = 1 - d, default 0.001 (d = 0.999,
  TensorFlow's ``MovingAvgQuantize``), debiased as TF's ``assign_moving_average``
  (range_t = b_t / (1 - d^t), b_t = d b_(t-1) + (1 - d) r_t, b_0 = 0: the first batch's range
  at t = 1, an even average of a short run's batches, the plain EMA in a long run).
* :class:`HistogramObserver`  histogram of |x| -> 'percentile', 'mse' or 'kl' (TensorRT)
  clipping; KL searches with 2^(b-1) quantized bins for a signed grid and 2^b for an
  unsigned one (an affine quantizer on a non-negative stream), as NVIDIA's calibrator. When a batch exceeds the current range the histogram is re-binned onto the
  wider range, each old bin's count moving to the new bin holding its centre (an
  approximation of the same kind as PyTorch's HistogramObserver). Non-negative streams
  (ReLU outputs) get (0, t), others (-t, t).
* :class:`ACIQObserver`       ACIQ (Banner 2018) from the count-weighted average of per-batch
  mean and spread (b = mean|x - mean| or sigma); a simplification of fitting on all data.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.quant import aciq, calibration
from qtrain.quant import uniform as U

EMA_MOMENTUM = 0.001  # 1 - 0.999 (Jacob et al. 2018 sec. 3.1; TensorFlow's MovingAvgQuantize)


class Observer(nn.Module):
    def __init__(self, name: str = "observer") -> None:
        super().__init__()
        self.name = name
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        U.check_finite(x, self.name)
        return x.detach().float()

    def _require_data(self) -> None:
        if int(self.count) == 0:
            raise ValueError(f"{self.name}: observer has seen no data; run calibration batches")

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_range(self, bits: int, symmetric: bool = True):
        raise NotImplementedError

    def reset(self) -> None:
        self.count.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return x


class MinMaxObserver(Observer):
    """Global min/max (``momentum=None``) or the debiased EMA with d = 1 - ``momentum``
    (module docstring)."""

    def __init__(self, momentum: float | None = None, name: str = "observer") -> None:
        super().__init__(name)
        if momentum is not None and not 0 < momentum <= 1:
            raise ConfigError(f"{name}: momentum={momentum} must be in (0, 1] (1 - EMA decay; "
                              "default 0.001, i.e. decay 0.999)")
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))

    @torch.no_grad()
    def update(self, x):
        x = self._check(x)
        lo, hi = x.min(), x.max()
        if int(self.count) == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        elif self.momentum is None:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:  # debiased: c = d (1 - d^(t-1)) / (1 - d^t) on the debiased range
            d, t = 1 - self.momentum, int(self.count) + 1
            c = d * (1 - d ** (t - 1)) / (1 - d**t)
            self.min_val.mul_(c).add_((1 - c) * lo)
            self.max_val.mul_(c).add_((1 - c) * hi)
        self.count += 1

    def compute_range(self, bits, symmetric=True):
        self._require_data()
        return self.min_val.clone(), self.max_val.clone()


class HistogramObserver(Observer):
    """Histogram of |x| in ``bins`` bins; ``method``: 'kl' | 'percentile' | 'mse'."""

    METHODS = ("kl", "percentile", "mse")

    def __init__(self, method: str = "kl", bins: int = calibration.KL_BINS,
                 percentile: float = 99.99, kl_start: int = calibration.KL_START,
                 name: str = "observer") -> None:
        super().__init__(name)
        if method not in self.METHODS:
            raise ValueError(f"{name}: method={method!r}; allowed: {self.METHODS}")
        if not isinstance(bins, int) or not 1 <= kl_start < bins:
            raise ValueError(f"{name}: need 1 <= kl_start < bins; got kl_start={kl_start}, "
                             f"bins={bins}")
        self.method, self.bins, self.percentile, self.kl_start = method, bins, percentile, kl_start
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("amax", torch.tensor(0.0))
        self.register_buffer("min_val", torch.tensor(0.0))

    @torch.no_grad()
    def update(self, x):
        a = self._check(x)
        self.min_val.copy_(a.min() if int(self.count) == 0 else torch.minimum(self.min_val, a.min()))
        a = a.abs().flatten()
        new_max = max(a.max().item(), self.amax.item())
        if new_max == 0:
            new_max = 1.0
        if new_max > self.amax.item() and int(self.count) > 0 and self.amax.item() > 0:
            old_w = self.amax.item() / self.bins
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_w
            idx = (centres / (new_max / self.bins)).long().clamp(max=self.bins - 1)
            self.hist.copy_(torch.zeros_like(self.hist).index_add_(0, idx, self.hist))
        if new_max > self.amax.item():
            self.amax.fill_(new_max)
        self.hist += torch.histc(a, self.bins, 0.0, self.amax.item()).double()
        self.count += 1

    def unsigned(self, symmetric: bool) -> bool:
        """Unsigned grid: an affine quantizer on a non-negative stream (range (0, t), 2^b
        levels); a symmetric quantizer, or signed data, spends 2^(b-1) levels on [0, t]."""
        return not symmetric and self.min_val.item() >= 0

    def threshold(self, bits: int, symmetric: bool = True) -> float:
        self._require_data()
        w = self.amax.item() / self.bins
        if self.method == "kl":
            return calibration.kl_threshold_from_hist(
                self.hist, w, bits, self.unsigned(symmetric), self.kl_start)
        if self.method == "percentile":
            cdf = self.hist.cumsum(0) / self.hist.sum()
            i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=cdf.dtype)))
            return min(i + 1, self.bins) * w
        centres = ((torch.arange(self.bins, dtype=torch.float64) + 0.5) * w).float()
        nz = self.hist > 0
        # |x| >= 0: an unsigned grid is affine on [0, t], a signed one symmetric
        _, hi = calibration.mse_range_search(centres[nz], bits, not self.unsigned(symmetric),
                                             self.hist[nz], name=self.name)
        return hi.item()

    def compute_range(self, bits, symmetric=True):
        t = torch.tensor(self.threshold(bits, symmetric))
        lo = torch.zeros(()) if self.min_val.item() >= 0 else -t
        return lo, t


class ACIQObserver(Observer):
    """ACIQ clip range (Laplace or Gaussian prior) from per-batch statistics."""

    def __init__(self, distribution: str = "laplace", name: str = "observer") -> None:
        super().__init__(name)
        if distribution not in aciq.DISTRIBUTIONS:
            raise ValueError(f"{name}: distribution={distribution!r}; allowed {aciq.DISTRIBUTIONS}")
        self.distribution = distribution
        self.register_buffer("n", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("sum_mean", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("sum_spread", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(0.0))

    @torch.no_grad()
    def update(self, x):
        x = self._check(x).double().flatten()
        mu = x.mean()
        spread = (x - mu).abs().mean() if self.distribution == "laplace" else x.std(unbiased=False)
        k = x.numel()
        self.n += k
        self.sum_mean += k * mu
        self.sum_spread += k * spread
        lo = x.min().float()
        self.min_val.copy_(lo if int(self.count) == 0 else torch.minimum(self.min_val, lo))
        self.count += 1

    def compute_range(self, bits, symmetric=True):
        self._require_data()
        mu, spread = self.sum_mean / self.n, self.sum_spread / self.n
        alpha = aciq.aciq_alpha(bits, self.distribution) * spread
        lo, hi = (mu - alpha).float(), (mu + alpha).float()
        if self.min_val.item() >= 0:  # non-negative stream: do not spend codes below 0
            lo = torch.maximum(lo, torch.zeros(()))
        return lo, hi


def make_observer(kind: str, name: str = "observer", **kw) -> Observer:
    """Observer by calibration name: minmax, ema, percentile, mse, kl, aciq (-laplace/-gaussian)."""
    if kind == "minmax":
        return MinMaxObserver(None, name=name)
    if kind == "ema":
        return MinMaxObserver(kw.pop("momentum", EMA_MOMENTUM), name=name)
    if kind in HistogramObserver.METHODS:
        return HistogramObserver(kind, name=name, **kw)
    if kind in ("aciq", "aciq-laplace", "aciq-gaussian"):
        return ACIQObserver("gaussian" if kind.endswith("gaussian") else "laplace", name=name)
    raise ValueError(
        f"{name}: calibration {kind!r} not supported; allowed: minmax, ema, percentile, mse, "
        "kl, aciq, aciq-laplace, aciq-gaussian"
    )
