"""Calibrated clip values are the grid's end levels: q(alpha) == alpha (and -alpha for a
symmetric signed grid) for every calibration method at 2/4/8 bits, and the quantizer equals
PyTorch's fake-quant op with S = alpha / (2^(b-1) - 1) (signed) or alpha / (2^b - 1)
(unsigned) -- not the observer convention alpha / (2^(b-1) - 0.5), which clips alpha to
0.67 alpha at 2 bits and 0.93 alpha at 4."""

import math
from fractions import Fraction

import pytest
import torch

from qtrain.nn.calibrated_quantizer import CalibratedQuantizer
from qtrain.quant import uniform as U

METHODS = ["minmax", "ema", "percentile", "mse", "kl", "aciq", "aciq-gaussian"]


def _batches(signed):
    torch.manual_seed(0)
    xs = [torch.distributions.Laplace(0.0, 1.0).sample((4, 2000)) for _ in range(3)]
    xs[1][0, :5] *= 8  # outliers: the calibrated thresholds clip
    return xs if signed else [x.relu() for x in xs]


def _calibrated(method, bits, signed, symmetric=None):
    symmetric = signed if symmetric is None else symmetric
    kw = {"percentile": 99.9} if method == "percentile" else {}
    q = CalibratedQuantizer(bits, method, symmetric=symmetric, **kw)
    q.calibrating = True
    for b in _batches(signed):
        q(b)
    q.freeze()
    lo, hi = q.observer.compute_range(bits, symmetric)
    return q, lo.item(), hi.item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
def test_affine_quantizer_on_signed_stream_keeps_both_thresholds(method, bits):
    # histogram methods give +-t on signed data; an affine grid then spends 2^b - 1 codes
    # on [-t, t] (one spare below): both ends exact (old nudged grid: 0.93 t / -1.07 t at 4 bits)
    q, lo, hi = _calibrated(method, bits, signed=True, symmetric=False)
    assert lo == -hi
    out = q(torch.tensor([hi, -hi, 3 * hi]))
    torch.testing.assert_close(out, torch.tensor([hi, -hi, hi]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_symmetric_threshold_is_the_end_level(method, bits):
    q, lo, hi = _calibrated(method, bits, signed=True)
    alpha = max(-lo, hi)
    qmax = 2 ** (bits - 1) - 1
    x = torch.tensor([alpha, -alpha, 2 * alpha, 0.3 * alpha, -0.7 * alpha])
    out = q(x)
    torch.testing.assert_close(out[:2], torch.tensor([alpha, -alpha]), rtol=1e-6, atol=0)
    assert out[2].item() == pytest.approx(alpha, rel=1e-6)  # clipped at alpha, not above
    ref = torch.fake_quantize_per_tensor_affine(x, alpha / qmax, 0, -qmax - 1, qmax)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_unsigned_threshold_is_the_top_level(method, bits):
    q, lo, hi = _calibrated(method, bits, signed=False)
    assert lo == 0.0
    n = 2**bits - 1
    x = torch.tensor([hi, 2 * hi, 0.0, 0.3 * hi, 0.77 * hi])
    out = q(x)
    assert out[0].item() == pytest.approx(hi, rel=1e-6)
    assert out[1].item() == pytest.approx(hi, rel=1e-6)
    ref = torch.fake_quantize_per_tensor_affine(x, hi / n, 0, 0, n)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_affine_signed_range_larger_end_exact_smaller_covered(bits):
    n = 2**bits - 1
    for lo, hi in [(-0.5, 1.3), (-1.3, 0.2), (-1.0, 1.0), (-2.0, 0.0)]:
        qp = U.qparams_from_clip(torch.tensor(lo), torch.tensor(hi), bits, False)
        grid = (torch.arange(0, n + 1, dtype=torch.float32) - qp.zero_point) * qp.scale
        big, small = max(hi, -lo), min(hi, -lo)
        ends = (grid.max().item(), -grid.min().item())
        exact, other = (ends[0], ends[1]) if hi >= -lo else (ends[1], ends[0])
        assert exact == pytest.approx(big, rel=1e-6)
        assert (grid == 0).any()  # zero exact
        if bits > 1:
            assert other >= small - 1e-6  # the smaller end inside the grid, not clipped
            # finest such grid (brute force over the number of steps k on the larger side)
            fs, fb = Fraction(str(small)), Fraction(str(big))  # exact: 0.2 * 221 / 1.3 = 34
            k_best = max(k for k in range(1, n + 1) if k + math.ceil(fs * k / fb) <= n)
            assert qp.scale.item() == pytest.approx(big / k_best, rel=1e-6)
