"""Bit allocation vs brute force, HAWQ Omega, Q-BERT Omega/tiers and group-wise ranges."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qtrain.hessian.allocation import allocate_bits
from qtrain.hessian.hawq import hawq_v1_order, omega_table, quantization_perturbation
from qtrain.hessian.qbert import assign_tier_bits, qbert_omega
from qtrain.nn.groupwise_quantizer import GroupwiseQuantizer

CHOICES = (2, 3, 4, 8)


def random_instance(rng, n_layers):
    numel = {f"l{i}": int(rng.integers(3, 40)) for i in range(n_layers)}
    # decreasing in bits like real Omega (but random), occasionally non-monotone
    omega = {n: {b: float(rng.random() * 4.0 ** -b * (1 + rng.random())) for b in CHOICES}
             for n in numel}
    return omega, numel


def brute_force(omega, numel, budget, ties=()):
    names = list(omega)
    best = (np.inf, None)
    for combo in itertools.product(CHOICES, repeat=len(names)):
        bits = dict(zip(names, combo))
        if any(len({bits[n] for n in t}) > 1 for t in ties):
            continue
        if sum(numel[n] * bits[n] for n in names) > budget:
            continue
        obj = sum(omega[n][bits[n]] for n in names)
        if obj < best[0]:
            best = (obj, bits)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocator_matches_brute_force_and_respects_budget(seed):
    rng = np.random.default_rng(seed)
    omega, numel = random_instance(rng, 5)
    total = sum(numel.values())
    ties = [["l1", "l3"]] if seed % 2 else []
    for avg in (2.0, 2.6, 3.3, 5.0, 8.0):
        budget = int(avg * total)
        exp_obj, exp_bits = brute_force(omega, numel, budget, ties)
        for max_states in (20_000_000, 1):  # DP, and the ILP fallback
            res = allocate_bits(omega, numel, budget, CHOICES, ties, max_states=max_states)
            assert res.solver == ("dp" if max_states > 1 else "milp")
            assert res.objective == pytest.approx(exp_obj, rel=1e-12)
            assert res.size_bits == sum(numel[n] * res.bits[n] for n in numel) <= budget
            assert sum(omega[n][res.bits[n]] for n in numel) == pytest.approx(exp_obj)
            for t in ties:
                assert len({res.bits[n] for n in t}) == 1


def test_tied_groups_get_equal_bits_even_when_untied_optimum_differs():
    numel = {"main": 10, "down": 10, "other": 10}
    omega = {"main": {2: 10.0, 3: 5, 4: 1, 8: 0}, "down": {2: 0.1, 3: 0.1, 4: 0.1, 8: 0},
             "other": {2: 1.0, 3: 0.5, 4: 0.2, 8: 0}}
    free = allocate_bits(omega, numel, 90, CHOICES)
    assert free.bits["main"] != free.bits["down"]
    tied = allocate_bits(omega, numel, 90, CHOICES, ties=[["main", "down"]])
    assert tied.bits["main"] == tied.bits["down"]
    assert tied.objective == pytest.approx(brute_force(omega, numel, 90, [["main", "down"]])[0])


def test_budget_below_lowest_bits_raises_with_both_numbers():
    omega, numel = random_instance(np.random.default_rng(0), 3)
    low = 2 * sum(numel.values())
    with pytest.raises(ValueError, match=rf"budget {low - 1} bits.*all-2-bit size {low} bits"):
        allocate_bits(omega, numel, low - 1, CHOICES)
    with pytest.raises(ValueError, match="tied layer 'zz'"):
        allocate_bits(omega, numel, low, CHOICES, ties=[["l0", "zz"]])


def test_hawq_omega_and_v1_order_hand_computed():
    w = torch.tensor([[0.5, -1.0, 0.26], [2.0, 0.1, -0.3]])
    # per-channel symmetric 2-bit: codes -2..1, scale = max|w| / 1.5 per row
    s = torch.tensor([1.0 / 1.5, 2.0 / 1.5])[:, None]
    q = torch.clamp(torch.round(w / s), -2, 1) * s
    expect = float(((q - w) ** 2).sum())
    assert quantization_perturbation(w, 2) == pytest.approx(expect, rel=1e-6)
    table = omega_table({"a": 3.0}, {"a": w}, (2, 8))
    assert table["a"][2] == pytest.approx(3.0 / 6 * expect, rel=1e-6)
    assert table["a"][8] < table["a"][2]
    order = hawq_v1_order({"a": 10.0, "b": 3.0, "c": 1.0}, {"a": 100, "b": 10, "c": 1})
    assert order == ["c", "b", "a"]  # 1/1 > 3/10 > 10/100


def test_qbert_omega_and_tiers():
    eigs = {"b0": [1.0, 3.0], "b1": [-4.0, -4.0], "b2": [0.0, 0.2], "b3": [2.0, 2.0],
            "b4": [0.5, 0.5], "b5": [10.0, -10.0]}
    om = qbert_omega(eigs)
    assert om["b0"] == pytest.approx(2.0 + 1.0)
    assert om["b1"] == pytest.approx(4.0)
    assert om["b5"] == pytest.approx(0.0 + 10.0)
    bits = assign_tier_bits(om)  # order: b5, b1, b0, b3, b4, b2
    assert bits == {"b5": 4, "b1": 4, "b0": 3, "b3": 3, "b4": 2, "b2": 2}


def test_groupwise_ranges_independent_per_group():
    torch.manual_seed(0)
    q = GroupwiseQuantizer(bits=3, num_groups=8, num_heads=2)
    w = torch.randn(16, 5)
    idx = q.group_index(16)
    assert idx.tolist() == [i // 2 for i in range(16)]
    qp, _ = q.qparams(w)
    # each group's scale equals a per-tensor quantizer fitted on that group's rows alone
    for g in range(8):
        rows = w[idx == g]
        assert qp.scale[g].item() == pytest.approx(rows.abs().max().item() / 3.5, rel=1e-6)
    w2 = w.clone()
    w2[idx == 5] *= 7.0  # change group 5 only
    qp2, _ = q.qparams(w2)
    changed = (qp2.scale != qp.scale).nonzero().flatten().tolist()
    assert changed == [5]
    y1, y2 = q(w), q(w2)
    torch.testing.assert_close(y1[idx != 5], y2[idx != 5], rtol=0, atol=0)
    # 12 heads x 128 groups over 768 rows: 11 groups per head, every row in one group
    q2 = GroupwiseQuantizer(bits=4, num_groups=128, num_heads=12)
    idx2 = q2.group_index(768)
    assert q2.n_groups(torch.zeros(768, 4)) == 132 and len(idx2.unique()) == 132
    assert (idx2[:64] < 11).all() and (idx2[64:128] >= 11).all()
    assert q2.storage_bits(torch.zeros(768, 4)) == 768 * 4 * 4 + 132 * 32
    with pytest.raises(ValueError, match="num_heads=12"):
        q2.group_index(100)
