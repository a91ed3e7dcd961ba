"""Dettmers (2016) dynamic tree and linear 8-bit formats against independent references:
codes worked by hand from the paper's bit definition, a bit-string bisection walk, the
bitsandbytes-style construction (midpoints of linspace(0.1, 1) per decade, written out here
in numpy; bitsandbytes itself does not install here) and brute-force nearest-value search."""

import numpy as np
import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.quant.dynamic_tree import (
    chunk_lengths,
    dequantize,
    dynamic_tree_table,
    linear_table,
    make_table,
    quantize,
)

# code -> value, worked by hand: sign | zero run k (value 10^-k) | indicator 1 | f = 6 - k
# fraction bits m, value 0.1 + 0.9 (m + 1/2) / 2^f
HAND = {
    0b0_1_000000: 0.1 + 0.9 * 0.5 / 64,             # 0.10703125
    0b0_1_111111: 0.1 + 0.9 * 63.5 / 64,            # 0.99296875, the largest
    0b1_1_100000: -(0.1 + 0.9 * 32.5 / 64),         # -0.55703125
    0b0_0_1_00000: 0.1 * (0.1 + 0.9 * 0.5 / 32),    # 0.01140625
    0b0_0000_1_01: 1e-4 * (0.1 + 0.9 * 1.5 / 4),    # k = 4, m = 1: 4.375e-5
    0b0_000000_1: 1e-6 * 0.55,                      # k = 6, no fraction bit: the smallest
    0b1_000000_1: -1e-6 * 0.55,
    0b0_0000000: 0.0,
    0b1_0000000: 0.0,                               # no indicator bit: zero, either sign
}


def _bisection_walk(code: int) -> float:
    """Read the code as a bit string; halve [0.1, 1] once per fraction bit."""
    s = format(code, "08b")
    sign, rest = (-1.0 if s[0] == "1" else 1.0), s[1:]
    if "1" not in rest:
        return 0.0
    k = rest.index("1")
    lo, hi = 0.1, 1.0
    for b in rest[k + 1:]:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if b == "1" else (lo, mid)
    return sign * 10.0 ** -k * (lo + hi) / 2


def _bnb_style_magnitudes() -> np.ndarray:
    """Positive magnitudes, constructed per decade: 2^i midpoints of linspace(0.1, 1,
    2^i + 1) times 10^(i - 6), i = 0..6 (the signed 7-exponent-bit construction)."""
    out = []
    for i in range(7):
        b = np.linspace(0.1, 1.0, 2 ** i + 1)
        out.append(10.0 ** (i - 6) * (b[:-1] + b[1:]) / 2)
    return np.sort(np.concatenate(out))


def test_hand_worked_codes():
    t = dynamic_tree_table()
    for code, v in HAND.items():
        assert float(t[code]) == pytest.approx(v, rel=1e-6, abs=0), bin(code)


def test_table_equals_bisection_walk_and_bnb_construction():
    t = dynamic_tree_table().double().numpy()
    walk = np.array([_bisection_walk(c) for c in range(256)])
    np.testing.assert_allclose(t, walk, rtol=1e-6, atol=0)
    pos = np.sort(t[t > 0])
    np.testing.assert_allclose(pos, _bnb_style_magnitudes(), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.sort(-t[t < 0]), pos)  # symmetric
    # per decade: 64 fractions in [0.1, 1), 32 in [0.01, 0.1), ..., 1 at 1e-6
    counts = [int(((pos >= 10.0 ** -(k + 1)) & (pos < 10.0 ** -k)).sum()) for k in range(7)]
    assert counts == [64, 32, 16, 8, 4, 2, 1]
    assert (t == 0).sum() == 2


def test_shorter_tree_and_linear_table():
    t4 = dynamic_tree_table(4).double().numpy()  # sign | k in 0..2 | fraction bits 2 - k
    pos = np.sort(t4[t4 > 0])
    np.testing.assert_allclose(pos, [0.55e-2, 0.1 * 0.325, 0.1 * 0.775, 0.2125, 0.4375,
                                     0.6625, 0.8875], rtol=1e-6)
    lin = linear_table().double().numpy()
    np.testing.assert_allclose(lin, (np.arange(255) - 127) / 127, rtol=0, atol=1e-7)
    assert lin[127] == 0.0


@pytest.mark.parametrize("fmt", ["dynamic_tree", "linear"])
def test_encode_is_nearest_value_brute_force(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g) * 2 - 1,  # uniform in [-1, 1]
                   torch.sign(torch.randn(4000, generator=g))
                   * 10 ** (-7 * torch.rand(4000, generator=g)),  # log-uniform 1e-7 .. 1
                   torch.tensor([0.0, 1.0, -1.0])])
    table = make_table(fmt)
    got = table.decode(table.encode(x)).double()
    vals = table.values.double()
    ref = vals[(x.double()[:, None] - vals[None, :]).abs().argmin(1)]
    # equal up to exact ties (measure zero) -- compare the distances, not the picks
    np.testing.assert_allclose((got - x).abs(), (ref - x).abs(), rtol=0, atol=1e-12)
    assert table.encode(x).dtype == torch.uint8


@pytest.mark.parametrize("fmt", ["dynamic_tree", "linear"])
def test_quantize_segments_absmax(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, generator=g) * 1e-3, torch.zeros(7),
                   torch.randn(50, generator=g) * 5.0])
    lengths = torch.tensor([300, 7, 50])
    table = make_table(fmt)
    codes, scales = quantize(x, table, lengths)
    parts = torch.split(x, lengths.tolist())
    np.testing.assert_allclose(scales, [p.abs().max() for p in parts])
    y = dequantize(codes, scales, table, lengths)
    assert y[300:307].eq(0).all()
    vals = table.values.double()
    for p, yp, s in zip(parts, torch.split(y, lengths.tolist()), scales, strict=True):
        if s == 0:
            continue
        xn = p.double() / float(s)
        ref = vals[(xn[:, None] - vals[None, :]).abs().argmin(1)] * float(s)
        np.testing.assert_allclose(yp.double(), ref, rtol=1e-6, atol=0)
    # the absmax element: exact in linear 8-bit, 0.99297 x in the dynamic tree
    top = max(table.values.tolist())
    assert float(y[300:].abs().max()) == pytest.approx(float(scales[2]) * top, rel=1e-6)


def test_chunk_lengths_and_bad_input():
    assert chunk_lengths(10, 4).tolist() == [4, 4, 2]
    assert chunk_lengths(8, 4).tolist() == [4, 4]
    x = torch.tensor([1.0, float("inf"), 2.0, 3.0])
    codes, scales = quantize(x, make_table("dynamic_tree"), torch.tensor([2, 2]))
    y = dequantize(codes, scales, make_table("dynamic_tree"), torch.tensor([2, 2]))
    assert not torch.isfinite(y[:2]).any() and torch.isfinite(y[2:]).all()
    with pytest.raises(ConfigError, match="allowed dynamic_tree, linear"):
        make_table("log")
    with pytest.raises(ConfigError, match="bits=9"):
        dynamic_tree_table(9)
