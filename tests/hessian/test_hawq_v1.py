"""HAWQ V1 (Dong et al. 2019 sec. 3.2-3.3): bits from the S_i = lambda_i / n_i order under a
size budget (a larger S_i never gets fewer bits) and the stage order by
Omega_i = lambda_i * ||Q(W_i) - W_i||^2, against hand computations and brute force."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn

from qtrain.hessian.hawq import hawq_v1_bits, hawq_v1_stage_order
from qtrain.hessian.sensitivity import SensitivityConfig, analyze
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture


def _np_perturbation(w: np.ndarray, bits: int) -> float:
    """||Q_b(W) - W||^2, per-row symmetric min-max: scale = max|w| / (2^(b-1) - 0.5), codes
    clamped to [-2^(b-1), 2^(b-1) - 1] (worked out by hand in numpy)."""
    s = np.abs(w).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 0.5)
    q = np.clip(np.round(w / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return float(((q - w) ** 2).sum())


class TwoBranches(nn.Module):
    """Two independent branches: loss = c_a ||W_a||^2 + c_b ||W_b||^2 on identity inputs, so
    H_a = 2 c_a I and lambda_a = 2 c_a exactly."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(10, 10, bias=False)  # n_a = 100
        self.b = nn.Linear(20, 20, bias=False)  # n_b = 400
        with torch.no_grad():
            self.a.weight.copy_(1e-3 * torch.randn(10, 10, generator=g))  # tiny: tiny ||Q(W)-W||
            self.b.weight.copy_(torch.randn(20, 20, generator=g))


C = {"a": 3.74 * 100 / 2, "b": 0.0025 * 400 / 2}  # S_a = 3.74, S_b = 0.0025


def _loss(model, batch):
    return (C["a"] * (model.a(torch.eye(10)) ** 2).sum()
            + C["b"] * (model.b(torch.eye(20)) ** 2).sum())


def test_two_branches_more_sensitive_never_fewer_bits():
    model = TwoBranches()
    budget = 2 * 100 + 8 * 400  # fits exactly a@2 + b@8 (what V2's knapsack picks here)
    cfg = SensitivityConfig("hawq_v1", budget_bits=budget, eig_max_iter=50, eig_tol=1e-8)
    rows, bits = analyze(model, ["a", "b"], [None], _loss, cfg)
    by = {r["layer"]: r for r in rows}
    assert by["a"]["sensitivity"] == pytest.approx(3.74, rel=1e-5)
    assert by["b"]["sensitivity"] == pytest.approx(0.0025, rel=1e-5)
    # by hand: a first: widest b_a with 100 b_a + 400 * 2 <= 3400 -> 8; then b_b <= 8 with
    # 800 + 400 b_b <= 3400 -> 4 (8 would need 4000)
    assert bits == {"a": 8, "b": 4}
    # Omega_i = lambda_i ||Q(W_i) - W_i||^2 at those bits, by hand; the stage order follows it
    lam = {"a": 2 * C["a"], "b": 2 * C["b"]}
    w = {n: getattr(model, n).weight.detach().double().numpy() for n in "ab"}
    om = {n: lam[n] * _np_perturbation(w[n], bits[n]) for n in "ab"}
    for n in "ab":
        assert by[n]["omega"] == pytest.approx(om[n], rel=1e-4)
    first = max(om, key=om.get)
    assert by[first]["stage"] == 0 and by[min(om, key=om.get)]["stage"] == 1


def _brute_force_lexmax(s, n, budget, choices):
    """Among all assignments with size <= budget that never give a larger S fewer bits, the
    one that is widest first in S order (lexicographic), by enumeration."""
    names = sorted(s, key=lambda k: -s[k])
    best = None
    for combo in itertools.product(sorted(choices), repeat=len(names)):
        b = dict(zip(names, combo))
        if sum(n[k] * b[k] for k in names) > budget:
            continue
        if any(s[i] > s[j] and b[i] < b[j] for i in names for j in names):
            continue
        key = tuple(b[k] for k in names)
        if best is None or key > best[0]:
            best = (key, b)
    return best[1]


def test_monotone_in_s_within_budget_and_equal_to_brute_force():
    rng = random.Random(0)
    choices = (2, 3, 4, 8)
    for _ in range(300):
        k = rng.randint(1, 5)
        names = [f"l{i}" for i in range(k)]
        lam = {m: rng.uniform(1e-3, 50.0) for m in names}
        n = {m: rng.choice([9, 64, 100, 576, 2304, 4096]) for m in names}
        s = {m: lam[m] / n[m] for m in names}
        lo = 2 * sum(n.values())
        budget = rng.randint(lo, 8 * sum(n.values()) + 50)
        bits = hawq_v1_bits(s, n, budget, choices)
        assert sum(n[m] * bits[m] for m in names) <= budget
        for i, j in itertools.permutations(names, 2):
            if s[i] > s[j]:
                assert bits[i] >= bits[j], (s, n, budget, bits)
        assert bits == _brute_force_lexmax(s, n, budget, choices)


def test_ties_share_bits_and_budget_errors():
    s = {"x": 5.0, "y": 0.1, "z": 1.0}
    n = {"x": 10, "y": 10, "z": 10}
    # (x, y) tied: one item ranked by max S = 5, n = 20 -> 8 bits if 160 + 2*10 <= budget
    assert hawq_v1_bits(s, n, 180, (2, 4, 8), ties=[["x", "y"]]) == {"x": 8, "y": 8, "z": 2}
    assert hawq_v1_bits(s, n, 179, (2, 4, 8), ties=[["x", "y"]]) == {"x": 4, "y": 4, "z": 4}
    with pytest.raises(ValueError, match="below the all-2-bit size 60"):
        hawq_v1_bits(s, n, 59, (2, 4, 8))


def test_stage_order_hand_computed():
    omega = {"c1": 0.5, "c2": 7.0, "c3": 2.0, "c4": 2.5}
    assert hawq_v1_stage_order(omega) == [["c2"], ["c4"], ["c3"], ["c1"]]
    # a tie group is one stage ranked by its summed Omega: c1 + c3 = 2.5 ... c4 = 2.5 (stable)
    assert hawq_v1_stage_order(omega, [["c1", "c3"]]) == [["c2"], ["c1", "c3"], ["c4"]]
