"""Fixed-point requantization (Jacob et al. 2018 eq. 6 / Appendix; gemmlowp semantics)
against hand-worked values and brute-force Python-int references."""

import random
from fractions import Fraction

import pytest
import torch

from qtrain.quant import requantize as R

IMIN, IMAX = -(2**31), 2**31 - 1


def _srdhm_ref(a: int, b: int) -> int:
    """High 32 bits of 2ab, nearest, ties toward +inf; -2^31 * -2^31 saturates."""
    if a == b == IMIN:
        return IMAX
    return (2 * a * b + 2**31) // 2**32  # Python floor division: floor(ab / 2^31 + 1/2)


def _rdbpot_ref(x: int, e: int) -> int:
    """x / 2^e to nearest, ties away from zero (exact rational arithmetic)."""
    q = Fraction(x, 2**e)
    r = int(abs(q) + Fraction(1, 2))  # floor(|q| + 1/2)
    return r if q >= 0 else -r


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


def test_quantize_multiplier_hand_worked():
    assert R.quantize_multiplier(0.5) == (2**30, 0)
    assert R.quantize_multiplier(0.75) == (3 * 2**29, 0)
    # 0.1 = 0.8 * 2^-3; round(0.8 * 2^31) = round(1717986918.4) = 1717986918
    assert R.quantize_multiplier(0.1) == (1717986918, 3)
    assert R.quantize_multiplier(1.0) == (2**30, -1)  # M >= 1: left shift by 1
    # q rounds up to 2^31: halve M0 and bump the exponent
    assert R.quantize_multiplier(1 - 2**-40) == (2**30, -1)
    assert R.quantize_multiplier(0.0) == (0, 0)
    assert R.quantize_multiplier(2**-40) == (0, 0)  # below 2^-32: TFLite's zero multiplier
    with pytest.raises(ValueError, match="M="):
        R.quantize_multiplier(-0.5)


def test_quantize_multiplier_random_within_half_ulp():
    rng = random.Random(0)
    for _ in range(2000):
        m = rng.uniform(1e-6, 4.0)
        m0, n = R.quantize_multiplier(m)
        assert 2**30 <= m0 < 2**31
        approx = Fraction(m0, 2**31) * Fraction(2) ** (-n)
        # M0 is M's mantissa rounded to 31 fractional bits: relative error <= 2^-31
        assert abs(approx - Fraction(m)) <= Fraction(m) * Fraction(1, 2**31)


def test_srdhm_hand_worked():
    # 2^30 * 2^30 * 2 / 2^32 = 2^29 exactly
    assert int(R.saturating_rounding_doubling_high_mul(_t(2**30), 2**30)) == 2**29
    # a b / 2^31 = 0.5 -> 1 ; -0.5 -> 0 (ties toward +inf); -1.5 -> -1; 1.5 -> 2
    assert int(R.saturating_rounding_doubling_high_mul(_t(2**15), 2**15)) == 1
    assert int(R.saturating_rounding_doubling_high_mul(_t(-(2**15)), 2**15)) == 0
    assert int(R.saturating_rounding_doubling_high_mul(_t(-3 * 2**15), 2**15)) == -1
    assert int(R.saturating_rounding_doubling_high_mul(_t(3 * 2**15), 2**15)) == 2
    assert int(R.saturating_rounding_doubling_high_mul(_t(IMIN), IMIN)) == IMAX


def test_rdbpot_hand_worked():
    x = _t([5, 6, 7, -5, -6, -7, 12, -12, 0, -1, 1])
    # /4: 1.25 1.5 1.75 -1.25 -1.5 -1.75 3 -3 0 -0.25 0.25
    assert R.rounding_divide_by_pot(x, 2).tolist() == [1, 2, 2, -1, -2, -2, 3, -3, 0, 0, 0]
    assert R.rounding_divide_by_pot(x, 0).tolist() == x.tolist()
    with pytest.raises(ValueError, match="exponent"):
        R.rounding_divide_by_pot(x, 32)


def test_srdhm_and_rdbpot_vs_brute_force():
    rng = random.Random(1)
    special = [IMIN, IMIN + 1, -1, 0, 1, IMAX, 2**30, -(2**30)]
    a = [rng.randint(IMIN, IMAX) for _ in range(3000)] + special * len(special)
    b = [rng.randint(IMIN, IMAX) for _ in range(3000)] + [s for s in special for _ in special]
    # small products hit the rounding ties often
    a += [rng.randint(-(2**17), 2**17) for _ in range(3000)]
    b += [rng.choice([2**14, 2**15, 3 * 2**14, rng.randint(-(2**16), 2**16)]) for _ in range(3000)]
    got = R.saturating_rounding_doubling_high_mul(_t(a), _t(b)).tolist()
    assert got == [_srdhm_ref(x, y) for x, y in zip(a, b)]
    e = [rng.randint(0, 31) for _ in a]
    got = R.rounding_divide_by_pot(_t(a), _t(e)).tolist()
    assert got == [_rdbpot_ref(x, k) for x, k in zip(a, e)]


def test_multiply_by_quantized_multiplier_vs_exact():
    """The integer product equals round(x M0 2^-31 2^-n) up to the two roundings (the
    high-mul's and the shift's): within 1 of the exact rational product, and exactly the
    composition of the two references."""
    rng = random.Random(2)
    xs = [rng.randint(-(2**24), 2**24) for _ in range(2000)]
    ms = [rng.choice([rng.uniform(1e-5, 1.0), rng.uniform(1.0, 8.0)]) for _ in xs]
    pairs = [R.quantize_multiplier(m) for m in ms]
    got = R.multiply_by_quantized_multiplier(
        _t(xs), _t([p[0] for p in pairs]), _t([p[1] for p in pairs])).tolist()
    for x, (m0, n), g in zip(xs, pairs, got):
        left, right = max(-n, 0), max(n, 0)
        assert g == _rdbpot_ref(_srdhm_ref(x * 2**left, m0), right)
        assert abs(Fraction(g) - x * Fraction(m0, 2**31) * Fraction(2) ** (-n)) <= 1


def test_requantize_clamps_and_fuses_relu():
    m0, n = R.quantize_multiplier(0.25)
    acc = _t([-400, -4, 0, 3, 400, 2000])
    # 0.25 acc = -100, -1, 0, 0.75->1, 100, 500 ; + Z 10 ; clamp [10 (ReLU), 255]
    assert R.requantize(acc, m0, n, 10, 10, 255).tolist() == [10, 10, 10, 11, 110, 255]
    assert R.requantize(acc, m0, n, 10, 0, 255).tolist() == [0, 9, 10, 11, 110, 255]


def test_integer_tensors_required():
    with pytest.raises(TypeError, match="integer"):
        R.rounding_divide_by_pot(torch.tensor([1.0]), 1)
