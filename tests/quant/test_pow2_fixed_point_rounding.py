"""INQ levels, power-of-two scales, dynamic fixed point and stochastic rounding."""

import math

import pytest
import torch

from qtrain.quant.fixed_point import fake_dfp, shared_exponent
from qtrain.quant.pow2 import (
    inq_exponent_range,
    inq_levels,
    inq_quantize,
    pow2_scale,
    round_to_levels,
)
from qtrain.quant.rounding import stochastic_round


def test_inq_levels_paper_example():
    # s = 0.9: n1 = floor(log2(1.2)) = 0; b=5 -> n2 = 0 + 1 - 8 = -7 (8 exponents)
    w = torch.tensor([0.9, -0.1])
    assert inq_exponent_range(w, 5) == (0, -7)
    lv = inq_levels(w, 5)
    assert lv.numel() == 17 and lv.max().item() == 1.0 and lv[9].item() == 2.0**-7
    assert inq_levels(w, 2).tolist() == [-1.0, 0.0, 1.0]  # b=2: ternary


def test_inq_rounding_matches_brute_force_and_tie_rule():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, generator=g) * 0.2
    lv = inq_levels(w, 4)
    out = round_to_levels(w, lv)
    dist = (w[:, None] - lv[None, :]).abs()
    ref = lv[dist.argmin(1)]
    torch.testing.assert_close(out, ref)
    # ties go to the larger magnitude (INQ eq. 4), symmetric in sign
    _, n2 = inq_exponent_range(w, 4)
    t = torch.tensor([1.5 * 2.0**n2, -1.5 * 2.0**n2, 2.0 ** (n2 - 1), -(2.0 ** (n2 - 1))])
    assert round_to_levels(t, lv).tolist() == [2.0 ** (n2 + 1), -(2.0 ** (n2 + 1)),
                                               2.0**n2, -(2.0**n2)]
    assert round_to_levels(torch.tensor([0.99 * 2.0 ** (n2 - 1)]), lv).item() == 0.0


def test_inq_bad_bits():
    with pytest.raises(ValueError, match="bits=1"):
        inq_levels(torch.ones(3), 1)


def test_inq_quantize_ste():
    w = torch.tensor([0.3, -0.7], requires_grad=True)
    inq_quantize(w, 3).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0]


def test_pow2_scale():
    s = torch.tensor([0.3, 0.25, 0.37, 5.0])
    assert pow2_scale(s, "ceil").tolist() == [0.5, 0.25, 0.5, 8.0]
    assert pow2_scale(s, "nearest").tolist() == [0.25, 0.25, 0.5, 4.0]


def test_dynamic_fixed_point_by_hand():
    x = torch.tensor([3.3, -1.26, 0.01, 2.9999], requires_grad=True)
    # max 3.3 -> floor(log2 3.3) = 1 -> E = 1 + 1 - 7 = -5 for 8 bits, step 1/32
    assert shared_exponent(x, 8) == -5
    out = fake_dfp(x, 8)
    ref = torch.round(x.detach() * 32) / 32
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1]
    # 4 bits: step 2^-1, codes clamp to +-7 (3.3 -> 3.5 fits; no overflow at the top)
    assert fake_dfp(torch.tensor([3.3, 3.9, -3.6]), 4).tolist() == [3.5, 3.5, -3.5]


def test_stochastic_rounding_unbiased_and_seeded():
    x = torch.tensor([0.1, 2.5, -1.7, 3.0]).repeat(50000)
    a = stochastic_round(x, torch.Generator().manual_seed(1))
    b = stochastic_round(x, torch.Generator().manual_seed(1))
    c = stochastic_round(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a = a.reshape(-1, 4)
    assert torch.equal(a - torch.floor(x[:4]), (a - torch.floor(x[:4])).clamp(0, 1))
    for j, v in enumerate([0.1, 2.5, -1.7, 3.0]):
        p = v - math.floor(v)
        tol = 5 * math.sqrt(max(p * (1 - p), 1e-12) / a.shape[0])
        assert abs(a[:, j].double().mean().item() - v) <= tol + 1e-12
