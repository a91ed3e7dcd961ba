"""Calibration: KL vs brute force, ACIQ vs closed forms / paper table, percentile, MSE,
value-aware quantization."""

import math

import numpy as np
import pytest
import torch

from qtrain.quant import uniform as U
from qtrain.quant.aciq import aciq_alpha, aciq_range, gaussian_mse, laplace_mse
from qtrain.quant.calibration import (
    abs_histogram,
    kl_levels,
    kl_threshold,
    minmax_range,
    mse_range_search,
    percentile_range,
)
from qtrain.quant.value_aware import value_aware_fake_quantize, value_aware_storage_bits


def _brute_force_kl_threshold(hist, width, bits, unsigned, start=128):
    """Migacz's pseudo-code, one candidate and one level at a time (numpy, loops), with
    NVIDIA's count of quantized bins: 2^(b-1) for signed data, 2^b for unsigned."""
    levels = 2**bits if unsigned else 2 ** (bits - 1)
    hist = np.asarray(hist, dtype=np.float64)
    best, best_i = math.inf, None
    for i in range(start, len(hist)):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        merged = max(1, i // levels)
        q = np.zeros(i)
        for lv in range(levels):
            a = lv * merged
            b = i if lv == levels - 1 else min((lv + 1) * merged, i)
            seg = hist[a:b]
            nz = seg > 0
            if nz.any():
                q[a:b][nz] = seg.sum() / nz.sum()
        p /= p.sum()
        q /= q.sum()
        q[(p > 0) & (q == 0)] = 1e-12
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * width


def _kl_sample(dist):
    g = torch.Generator().manual_seed(0)
    if dist == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    if dist == "relu_gaussian":  # unsigned data: post-ReLU activations with outliers
        x = torch.randn(50000, generator=g)
        x[:20] = x[:20].abs() * 12
        return x.relu()
    x = torch.randn(50000, generator=g)
    x[:20] *= 12  # a few outliers: the optimum clips well below max|x|
    return x


def _kl_case(dist, bins, bits):
    x = _kl_sample(dist)
    unsigned = dist == "relu_gaussian"
    hist, width = abs_histogram(x, bins)
    ref = _brute_force_kl_threshold(hist.numpy(), width, bits, unsigned)
    got = kl_threshold(x, bits, bins=bins)  # signedness read from the data
    assert got == pytest.approx(ref, rel=1e-12)
    if dist == "gaussian_with_outliers":
        assert ref < 0.5 * x.abs().max().item()
    return got


@pytest.mark.parametrize("dist", ["laplace", "gaussian_with_outliers", "relu_gaussian"])
def test_kl_threshold_equals_brute_force_small_histogram_per_bit_width(dist):
    t8, t4 = _kl_case(dist, 512, 8), _kl_case(dist, 512, 4)
    assert t4 != t8  # 8 (signed) / 16 (unsigned) levels at 4 bits, not 128 / 256


def test_kl_levels_nvidia_rule():
    # NVIDIA pytorch-quantization: nbins = 1 << (num_bits - 1 + int(unsigned))
    for bits in range(2, 9):
        for unsigned in (False, True):
            assert kl_levels(bits, unsigned) == 1 << (bits - 1 + int(unsigned))
    assert (kl_levels(8, False), kl_levels(8, True), kl_levels(4, False)) == (128, 256, 8)
    with pytest.raises(ValueError, match="bits"):
        kl_levels(0, True)


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["laplace", "gaussian_with_outliers"])
def test_kl_threshold_equals_brute_force_tensorrt_defaults(dist):
    _kl_case(dist, 2048, 8)


# Banner et al. 2018 (ACIQ), published optimal clipping values alpha*/b and alpha*/sigma
LAPLACE_TABLE = {1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
GAUSS_TABLE = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}


@pytest.mark.parametrize("bits", range(1, 9))
def test_aciq_matches_paper_table_and_minimises_closed_form(bits):
    a_l, a_g = aciq_alpha(bits, "laplace"), aciq_alpha(bits, "gaussian")
    assert abs(a_l - LAPLACE_TABLE[bits]) < 0.01
    assert abs(a_g - GAUSS_TABLE[bits]) < 0.01
    # independent check: dense grid minimum of the closed-form MSE
    a = torch.linspace(0.5, 15, 145001, dtype=torch.float64)
    noise = a**2 / (3 * 4**bits)
    lap = 2 * torch.exp(-a) + noise
    gau = ((a**2 + 1) * torch.special.erfc(a / math.sqrt(2))
           - math.sqrt(2 / math.pi) * a * torch.exp(-(a**2) / 2) + noise)
    assert abs(a[int(lap.argmin())].item() - a_l) < 2e-4
    assert abs(a[int(gau.argmin())].item() - a_g) < 2e-4
    assert laplace_mse(a_l, 1.0, bits) == pytest.approx(lap.min().item(), rel=1e-6)
    assert gaussian_mse(a_g, 1.0, bits) == pytest.approx(gau.min().item(), rel=1e-6)


def test_aciq_range_fits_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200000, generator=g) * 3 + 1
    lo, hi = aciq_range(x, 4, "gaussian")
    s = x.double().std(unbiased=False).item()
    assert hi.item() == pytest.approx(x.double().mean().item() + aciq_alpha(4, "gaussian") * s,
                                      rel=1e-5)
    assert (hi - lo).item() / 2 == pytest.approx(2.559 * 3, rel=0.01)
    with pytest.raises(ValueError, match="distribution"):
        aciq_alpha(4, "cauchy")


def test_percentile_and_minmax_vs_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10001, generator=g)
    lo, hi = percentile_range(x, 99.0, symmetric=False)
    assert lo.item() == pytest.approx(np.percentile(x.numpy(), 1.0, method="nearest"))
    assert hi.item() == pytest.approx(np.percentile(x.numpy(), 99.0, method="nearest"))
    lo, hi = percentile_range(x, 99.0)
    assert hi.item() == pytest.approx(np.percentile(np.abs(x.numpy()), 99.0, method="nearest"))
    assert lo.item() == -hi.item()
    assert minmax_range(x)[1].item() == x.max().item()


def test_mse_search_equals_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,))
    lo, hi = mse_range_search(x, 3, symmetric=True, n_grid=50)
    best, best_f = math.inf, None
    for k in range(1, 51):
        f = k / 50
        amax = max(-x.min().item(), x.max().item()) * f  # the grid: +-amax are levels
        qp = U.QParams(torch.tensor(amax / 3), torch.tensor(0.0), -4, 3)
        err = ((U.dequantize(U.quantize(x, qp), qp) - x) ** 2).sum().item()
        if err < best:
            best, best_f = err, f
    assert hi.item() == pytest.approx(x.max().item() * best_f, rel=1e-6)
    assert best_f < 1  # clipping helps at 3 bits on a Laplace
    del g


@pytest.mark.parametrize("fn", [
    lambda x: minmax_range(x, name="layer3.conv2"),
    lambda x: percentile_range(x, name="layer3.conv2"),
    lambda x: kl_threshold(x, name="layer3.conv2"),
    lambda x: aciq_range(x, 4, name="layer3.conv2"),
    lambda x: mse_range_search(x, 4, name="layer3.conv2"),
    lambda x: value_aware_fake_quantize(x, 4, name="layer3.conv2"),
])
def test_non_finite_input_names_layer(fn):
    for bad in (math.nan, math.inf):
        x = torch.randn(100)
        x[5] = bad
        with pytest.raises(ValueError, match="layer3.conv2"):
            fn(x)


def test_value_aware_by_hand():
    x = torch.tensor([0.1, -0.2, 0.3, 5.0, -0.4, 0.05, 0.25, -7.0, 0.15, 0.0], requires_grad=True)
    out = value_aware_fake_quantize(x, 3, ratio=0.2)  # 2 outliers: 5.0, -7.0
    assert out[3].item() == 5.0 and out[7].item() == -7.0
    inl = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.05, 0.25, 0.15, 0.0])
    scale = 0.4 / 3.5  # symmetric 3-bit on the narrowed range max|x| = 0.4
    ref = torch.clamp(torch.round(inl * (1 / torch.tensor(scale))), -4, 3) * scale
    keep = torch.ones(10, dtype=torch.bool)
    keep[[3, 7]] = False
    torch.testing.assert_close(out[keep], ref)
    out.sum().backward()
    assert x.grad[3].item() == 1.0 and x.grad[7].item() == 1.0
    # storage: 10 codes * 3 + 2 * (32 value + 4 index) + 32 scale
    assert value_aware_storage_bits(10, 3, 0.2) == 30 + 2 * 36 + 32
