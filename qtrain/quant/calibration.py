"""Clipping-range calibration: min-max, percentile, MSE-optimal search, KL (TensorRT).

Each function returns a range ``(lo, hi)`` (0-dim tensors) or a symmetric threshold for a
tensor or a histogram; :mod:`qtrain.nn.observers` accumulates statistics over batches and
calls these. ACIQ is in :mod:`qtrain.quant.aciq`, value-aware quantization in
:mod:`qtrain.quant.value_aware`. Every entry point rejects NaN/inf with a ValueError that
names ``name`` (the layer).

KL divergence (Migacz 2017, "8-bit Inference with TensorRT", GTC, slides 30-37; NVIDIA
pytorch-quantization ``calib/histogram.py::_compute_amax_entropy`` for the bit widths):
histogram of |x| in 2048 bins over [0, max|x|]; the quantized distribution has
``L = 2^(b-1)`` levels for signed data and ``2^b`` for unsigned data at b bits (NVIDIA:
``nbins = 1 << (num_bits - 1 + unsigned)``; 128 at int8 signed, 8 at int4 signed: a 4-bit
threshold is chosen for 8 levels, not 128). For each candidate i = start .. 2047 (``start``
128, NVIDIA's ``start_bin``): P = bins[0:i] with the tail sum(bins[i:]) folded into bin i-1;
Q = bins[0:i] merged into L levels (``max(1, i // L)`` bins per level, the last level takes
the remainder, as in the MXNet/TVM implementations; with i < L every bin is its own level)
and expanded back, each level's mass spread evenly over its non-empty bins (empty bins stay
0); P and Q normalised; threshold = (m + 0.5) * bin_width for m = argmin_i KL(P || Q)
(Migacz). Where P > 0 but Q = 0 (the tail folded into an empty bin) Q is set to 1e-12 (such
a candidate is effectively never chosen). Vectorised over candidates. Departures from
NVIDIA's code, kept from Migacz's slides: the merge (NVIDIA splits [0, i) at
``linspace(0, i, L + 1)``), the threshold (NVIDIA: the bin edge i * width), the first
argmin (NVIDIA: the last), and bin 0 (NVIDIA overwrites it with bin 1).
"""

from __future__ import annotations

import torch

from qtrain.quant import uniform as U

KL_BINS, KL_START = 2048, 128


def kl_levels(bits: int, unsigned: bool) -> int:
    """Quantized bins of the KL search: 2^(b-1) signed, 2^b unsigned (NVIDIA's rule)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"KL calibration: bits={bits!r} not supported; allowed 1..16")
    if bits == 1 and not unsigned:
        raise ValueError("KL calibration: signed data needs bits >= 2 (1 bit: unsigned only)")
    return 1 << (bits - 1 + int(bool(unsigned)))


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor cannot be calibrated")
    U.check_finite(x, name)
    return x.detach().float().flatten()


def minmax_range(x: torch.Tensor, name: str = "tensor"):
    x = _flat(x, name)
    return x.min(), x.max()


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile (0..1) by the nearest rank (works beyond torch.quantile's size limit)."""
    k = min(max(int(round(q * (x.numel() - 1))) + 1, 1), x.numel())
    return x.kthvalue(k).values


def percentile_range(
    x: torch.Tensor, percentile: float = 99.99, symmetric: bool = True, name: str = "tensor"
):
    """Symmetric: +-(percentile of |x|); affine: (100-p)-th and p-th percentiles of x."""
    if not 50 < percentile <= 100:
        raise ValueError(f"{name}: percentile={percentile} must be in (50, 100]")
    x = _flat(x, name)
    if symmetric:
        t = _kth(x.abs(), percentile / 100)
        return -t, t
    return _kth(x, 1 - percentile / 100), _kth(x, percentile / 100)


def _fq_err(values, weights, lo, hi, bits, symmetric):
    """Weighted squared error of quantizing ``values`` (N) with ranges lo, hi (C, 1)."""
    qp = U.qparams_from_clip(lo, hi, bits, symmetric)
    deq = U.dequantize(U.quantize(values[None, :], qp), qp)
    return ((deq - values[None, :]) ** 2 * weights[None, :]).sum(1)


def mse_range_search(
    values: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    weights: torch.Tensor | None = None,
    n_grid: int = 100,
    name: str = "tensor",
):
    """Range (lo*f, hi*f), f in {1/n, 2/n, .., 1}, minimising sum w (Q(v) - v)^2.

    ``values`` are samples (or histogram bin centres with ``weights`` = counts). The grid
    shrinks the min-max range; each candidate is scored on the grid it will quantize to,
    the range's end being a level (:func:`qtrain.quant.uniform.qparams_from_clip`); chunked
    over candidates to bound memory.
    """
    v = _flat(values, name)
    w = torch.ones_like(v) if weights is None else weights.detach().float().flatten()
    lo, hi = v.min(), v.max()
    f = torch.arange(1, n_grid + 1, dtype=torch.float32) / n_grid
    chunk = max(1, (1 << 24) // max(v.numel(), 1))
    errs = torch.cat([
        _fq_err(v, w, lo * f[i:i + chunk, None], hi * f[i:i + chunk, None], bits, symmetric)
        for i in range(0, n_grid, chunk)
    ])
    best = f[int(errs.argmin())]
    return lo * best, hi * best


def abs_histogram(x: torch.Tensor, bins: int = KL_BINS, name: str = "tensor"):
    """(counts float64 [bins], bin_width) of |x| over [0, max|x|]."""
    a = _flat(x, name).abs()
    amax = a.max().item()
    width = amax / bins if amax > 0 else 1.0 / bins
    hist = torch.histc(a, bins=bins, min=0.0, max=width * bins).double()
    return hist, width


def kl_divergences(hist: torch.Tensor, levels: int, start: int = KL_START):
    """KL(P_i || Q_i) for every candidate i in [start, len(hist)) (module docstring)."""
    hist = hist.double().flatten()
    nb = hist.numel()
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"KL calibration: levels={levels!r} must be a positive int")
    if not 1 <= start < nb:
        raise ValueError(f"KL calibration needs 1 <= start < bins; got start={start}, bins={nb}")
    tail = hist.flip(0).cumsum(0).flip(0)  # tail[i] = sum(hist[i:])
    j = torch.arange(nb)
    nonempty = hist > 0
    out = []
    for c0 in range(start, nb, 256):
        cand = torch.arange(c0, min(c0 + 256, nb))
        valid = j[None, :] < cand[:, None]
        merged = (cand // levels).clamp_min(1)[:, None]
        chunk = (j[None, :] // merged).clamp(max=levels - 1)
        p = torch.where(valid, hist[None, :], torch.zeros(()))
        p[torch.arange(cand.numel()), cand - 1] += tail[cand]  # P[i-1] += sum(hist[i:])
        csum = torch.zeros(cand.numel(), levels, dtype=torch.float64).scatter_add_(
            1, chunk, torch.where(valid, hist[None, :], torch.zeros(())))
        cnt = torch.zeros(cand.numel(), levels, dtype=torch.float64).scatter_add_(
            1, chunk, (valid & nonempty[None, :]).double())
        q = torch.where(valid & nonempty[None, :],
                        csum.gather(1, chunk) / cnt.gather(1, chunk).clamp_min(1), torch.zeros(()))
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
        q = torch.where((p > 0) & (q == 0), torch.full_like(q, 1e-12), q)
        kl = torch.where(p > 0, p * torch.log(p / q.clamp_min(1e-300)), torch.zeros(()))
        out.append(kl.sum(1))
    return torch.arange(start, nb), torch.cat(out)


def kl_threshold_from_hist(hist, bin_width: float, bits: int = 8, unsigned: bool = False,
                           start: int = KL_START) -> float:
    """Threshold (m + 0.5) * bin_width minimising KL at ``bits`` (signed or unsigned data)."""
    cand, kl = kl_divergences(hist, kl_levels(bits, unsigned), start)
    m = int(cand[int(kl.argmin())])
    return (m + 0.5) * bin_width


def kl_threshold(x: torch.Tensor, bits: int = 8, unsigned: bool | None = None,
                 bins: int = KL_BINS, start: int = KL_START, name: str = "tensor") -> float:
    """TensorRT entropy-calibration threshold of ``x`` for ``bits``-bit quantization: clip
    to +-threshold (signed) or [0, threshold] (unsigned; default: ``x`` has no negative
    value)."""
    if unsigned is None:
        unsigned = bool(_flat(x, name).min() >= 0)
    hist, width = abs_histogram(x, bins, name)
    return kl_threshold_from_hist(hist, width, bits, unsigned, start)
