"""Simulated FP16 / BF16 / FP8 equal casts through the torch dtypes; S2FP8 equations."""

import math

import pytest
import torch

from qtrain.quant.floats import (
    FORMATS,
    TORCH_DTYPES,
    fake_float,
    s2fp8_quantize,
    s2fp8_stats,
    simulate_float,
)


def _cast(x, fmt):
    return x.to(TORCH_DTYPES[fmt]).float()


def _probe(fmt, n=20000, seed=0):
    """Values spanning subnormals, normals, ties, overflow, and specials."""
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(f.e_min - f.man_bits - 3, int(math.log2(f.max_value)) + 3, (n,), generator=g)
    m = 1 + torch.rand(n, generator=g)
    x = torch.ldexp(m, e) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    # exact ties between two representable neighbours (exercise half-to-even)
    k = torch.randint(0, 2**f.man_bits, (200,), generator=g).float()
    ee = torch.randint(f.e_min, 4, (200,), generator=g)
    ties = torch.ldexp((2**f.man_bits + k + 0.5) / 2**f.man_bits, ee)
    sub_ties = (torch.arange(0, 8).float() + 0.5) * f.smallest_subnormal
    big = torch.tensor([f.max_value, f.max_value * 1.03, f.max_value * 1.07, f.max_value * 2])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf])
    return torch.cat([x, ties, -ties, sub_ties, big, -big, special])


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3", "e5m2"])
def test_simulation_equals_torch_cast(fmt):
    x = _probe(fmt)
    ours = simulate_float(x, fmt)  # default saturation = the cast's behaviour
    ref = _cast(x, fmt)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)


def test_nan_propagates():
    for fmt in FORMATS:
        assert torch.isnan(simulate_float(torch.tensor([math.nan]), fmt)).all()


def test_e4m3_non_saturating_gives_nan_and_saturating_clamps():
    x = torch.tensor([447.0, 463.9, 464.0, 470.0, 1e4, math.inf])
    sat = simulate_float(x, "e4m3", saturate=True)
    assert sat.tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, 448.0]
    nosat = simulate_float(x, "e4m3", saturate=False)
    # 464 is the tie between 448 (mantissa 110, even) and 480 (NaN code): stays 448
    assert nosat[:3].tolist() == [448.0, 448.0, 448.0]
    assert torch.isnan(nosat[3:]).all()


def test_e5m2_saturating_mode_clamps_to_max():
    x = torch.tensor([62000.0, 1e6, -math.inf])  # 61440 is the tie to 2^16
    assert simulate_float(x, "e5m2", saturate=True).tolist() == [57344.0, 57344.0, -57344.0]
    assert simulate_float(x, "e5m2", saturate=False).tolist() == [math.inf, math.inf, -math.inf]


def test_subnormals_e4m3_and_e5m2_by_hand():
    # smallest subnormals: e4m3 2^-9, e5m2 2^-16; half of it is a tie to 0 (even)
    assert simulate_float(torch.tensor([2.0**-9, 2.0**-10, 1.5 * 2.0**-10]), "e4m3").tolist() == [
        2.0**-9, 0.0, 2.0**-9]
    assert simulate_float(torch.tensor([3 * 2.0**-16, 3.5 * 2.0**-16]), "e5m2").tolist() == [
        3 * 2.0**-16, 4 * 2.0**-16]


def test_fake_float_gradient_clipped_when_saturating():
    x = torch.tensor([1.0, 500.0, -449.0, 3.3], requires_grad=True)
    fake_float(x, "e4m3").sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    y = torch.tensor([1.0, 1e5], requires_grad=True)
    fake_float(y, "e5m2").sum().backward()  # inf overflow: identity STE
    assert y.grad.tolist() == [1.0, 1.0]


def test_stochastic_float_rounding_unbiased_and_seeded():
    x = torch.full((200000,), 1.0 + 2.0**-12)  # between fp16 neighbours 1 and 1 + 2^-10
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = simulate_float(x, "fp16", rounding="stochastic", generator=g1)
    b = simulate_float(x, "fp16", rounding="stochastic", generator=g2)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {1.0, 1.0 + 2.0**-10}
    p_up = 0.25  # (2^-12) / (2^-10)
    frac = (a > 1).double().mean().item()
    assert abs(frac - p_up) < 5 * math.sqrt(p_up * (1 - p_up) / x.numel())


def test_s2fp8_stats_and_round_trip_by_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 1e-6
    x[::7] = 0
    alpha, beta = s2fp8_stats(x)
    logs = torch.log2(x[x != 0].abs())
    # squeezed log-magnitudes have mean 0 and max 15
    y = alpha * logs + beta
    assert abs(y.mean().item()) < 1e-4 and abs(y.max().item() - 15) < 1e-4
    out = s2fp8_quantize(x)
    # hand path: Y = 2^(alpha log2|x| + beta) -> cast E5M2 -> inverse map
    yq = torch.exp2(y).to(torch.float8_e5m2).float()
    ref = torch.sign(x[x != 0]) * torch.exp2((torch.log2(yq) - beta) / alpha)
    torch.testing.assert_close(out[x != 0], ref, rtol=1e-5, atol=0)
    assert (out[x == 0] == 0).all()
    # tiny values (all below fp8's range without the shift) keep 2-3 significant bits
    # wherever the squeezed Y lands in E5M2's normal range
    normal = y > -14
    rel = (out[x != 0] - x[x != 0]).abs() / x[x != 0].abs()
    assert normal.float().mean() > 0.9 and rel[normal].max() < 0.2
