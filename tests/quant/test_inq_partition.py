"""INQ math: levels against the paper's formula, partitions, schedules."""

import math

import pytest
import torch

from qtrain.quant import inq as INQ


def test_levels_and_rounding_match_formula_and_brute_force():
    w = torch.tensor([0.9, -0.5, 0.26, 0.01, -0.12, 0.3, 0.0])
    s = 0.9
    n1 = math.floor(math.log2(4 * s / 3))  # = 0
    n2 = n1 + 1 - 2 ** (5 - 1) // 2  # = -7
    lv = INQ.inq_levels(w, 5)
    expect = sorted([0.0] + [sgn * 2.0**k for k in range(n2, n1 + 1) for sgn in (1, -1)])
    assert lv.tolist() == expect
    q = INQ.round_to_levels(w, lv)
    brute = lv[(w[:, None] - lv[None]).abs().argmin(1)]
    torch.testing.assert_close(q, brute)
    assert q[0] == 1.0 and q[1] == -0.5 and q[3] == 0.0078125 and q[4] == -0.125


def test_grow_mask_magnitude_first_and_monotone():
    torch.manual_seed(0)
    w = torch.randn(40, 10)
    m = torch.zeros_like(w, dtype=torch.bool)
    prev = m
    for portion in INQ.check_schedule("4bit"):
        m = INQ.grow_mask(w, prev, portion, "magnitude")
        assert int(m.sum()) == round(portion * 400)
        assert (m | ~prev).all()  # superset of the previous mask
        thr = w.abs()[m & ~prev].min() if (m & ~prev).any() else None
        if thr is not None and not m.all():
            assert w.abs()[~m].max() <= thr
        prev = m
    assert m.all()


def test_random_partition_seeded_and_grows():
    w = torch.randn(100)
    f = torch.zeros(100, dtype=torch.bool)
    a = INQ.grow_mask(w, f, 0.3, "random", torch.Generator().manual_seed(1))
    b = INQ.grow_mask(w, f, 0.3, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and int(a.sum()) == 30
    c = INQ.grow_mask(w, a, 0.6, "random", torch.Generator().manual_seed(2))
    assert int(c.sum()) == 60 and (c | ~a).all()


def test_schedules_and_bad_input():
    assert INQ.check_schedule("5bit") == [0.5, 0.75, 0.875, 1.0]
    assert INQ.check_schedule("3bit")[-1] == 1.0
    for bad in ([0.5, 0.4, 1.0], [0.5, 0.9], "6bit"):
        with pytest.raises(ValueError, match="schedule"):
            INQ.check_schedule(bad)
    with pytest.raises(ValueError, match="strategy"):
        INQ.grow_mask(torch.randn(4), torch.zeros(4, dtype=torch.bool), 0.5, "smallest")
