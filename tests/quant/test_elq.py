"""ELQ math (qtrain.quant.elq) against hand-worked values and numpy brute force."""

import itertools

import numpy as np
import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.quant import elq

CODES = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0)}


def _best_for_codes(v, c):
    """numpy: optimal alpha >= 0 for fixed codes and the resulting ||alpha c - v||^2."""
    den = float((c * c).sum())
    a = max(float((c * v).sum()) / den, 0.0) if den > 0 else 0.0
    return a, float(((a * c - v) ** 2).sum())


def _brute_force(v, kind, fixed=None, fixed_codes=None):
    """Global minimum of ||alpha c - v||^2 over every code vector (free elements only)."""
    n = len(v)
    fixed = np.zeros(n, bool) if fixed is None else fixed
    free = np.flatnonzero(~fixed)
    best = (np.inf, None, None)
    for combo in itertools.product(CODES[kind], repeat=len(free)):
        c = np.array(fixed_codes, float) if fixed_codes is not None else np.zeros(n)
        c[free] = combo
        a, err = _best_for_codes(v, c)
        if err < best[0] - 1e-12:
            best = (err, a, c)
    return best


def test_objective_is_the_completed_square():
    # E = g.(W^ - W) + lam/2 ||W^ - W||^2 = lam/2 ||W^ - V||^2 - ||g||^2 / (2 lam)
    gen = torch.Generator().manual_seed(0)
    w, g, q = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    for lam in (0.1, 1.0, 7.0):
        v = elq.target(w, g, lam)
        want = 0.5 * lam * ((q - v) ** 2).sum() - (g * g).sum() / (2 * lam)
        assert float(elq.objective(w, q, g, lam)) == pytest.approx(float(want), rel=1e-12)
        assert torch.allclose(v, w - g / lam)


def test_hand_worked_example_binary_and_ternary():
    w = torch.tensor([0.9, -0.2, 0.4, -1.1])
    g = torch.tensor([0.1, 0.2, -0.3, 0.0])
    v = elq.target(w, g, 1.0)  # [0.8, -0.4, 0.7, -1.1]
    a, c, _ = elq.solve(v, "binary")
    assert c.tolist() == [1, -1, 1, -1] and float(a) == pytest.approx(0.75)  # mean |V|
    # ternary: TWN start Delta = 0.7 * 0.75 = 0.525 -> alpha 2.6 / 3; |0.4| < alpha / 2 -> 0
    a, c, _ = elq.solve(v, "ternary")
    assert c.tolist() == [1, 0, 1, -1] and float(a) == pytest.approx(2.6 / 3)
    # without the gradient (reconstruction of W only) the codes differ: the loss term acts
    a0, c0, _ = elq.solve(w, "ternary")
    assert c0.tolist() == [1, 0, 0, -1] and float(a0) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_binary_and_exact_ternary_are_the_global_minimum(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=7)
    tv = torch.tensor(v)
    for kind, exact in (("binary", False), ("ternary", True)):
        err, a_ref, c_ref = _brute_force(v, kind)
        a, c, _ = elq.solve(tv, kind, exact=exact)
        got = float(((float(a) * c - tv) ** 2).sum())
        assert got == pytest.approx(err, abs=1e-10)
        assert float(a) == pytest.approx(a_ref, abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_ternary_alternation_is_a_fixed_point_no_worse_than_its_start(seed):
    rng = np.random.default_rng(100 + seed)
    v = rng.normal(size=7) * rng.uniform(0.1, 3)
    a, c, iters = elq.solve(torch.tensor(v), "ternary")
    a, c = float(a), c.numpy()
    # alpha is optimal for the codes; each code is the per-element best for alpha
    assert a == pytest.approx(_best_for_codes(v, c)[0], abs=1e-12)
    per_elem = np.array([min(CODES["ternary"], key=lambda k: (a * k - x) ** 2) for x in v])
    assert (per_elem == c).all()
    # no worse than the TWN start (codes 1{|v| > 0.7 mean|v|}), no better than the optimum
    start = np.sign(v) * (np.abs(v) > 0.7 * np.abs(v).mean())
    err = float(((a * c - v) ** 2).sum())
    assert err <= _best_for_codes(v, start)[1] + 1e-12
    assert err >= _brute_force(v, "ternary")[0] - 1e-12
    assert 1 <= iters <= 100


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_fixed_codes_are_kept_and_the_rest_is_optimal(kind):
    rng = np.random.default_rng(7)
    v = rng.normal(size=7)
    fixed = np.array([True, True, False, False, False, True, False])
    fcodes = np.array([1.0, -1.0, 0, 0, 0, (1.0 if kind == "binary" else 0.0), 0])
    a, c, _ = elq.solve(torch.tensor(v), kind, torch.tensor(fixed), torch.tensor(fcodes),
                        exact=True)
    assert (c.numpy()[fixed] == fcodes[fixed]).all()
    err, a_ref, _ = _brute_force(v, kind, fixed, fcodes)
    assert float(((float(a) * c.numpy() - v) ** 2).sum()) == pytest.approx(err, abs=1e-10)


def test_nearest_codes_and_alpha_edge_cases():
    v = torch.tensor([0.5, -0.5, 0.49, 0.0, -2.0])
    assert elq.nearest_codes(v, 1.0, "ternary").tolist() == [0, 0, 0, 0, -1]  # tie -> 0
    assert elq.nearest_codes(v, 1.0, "binary").tolist() == [1, -1, 1, 1, -1]  # sign(0) = +1
    assert float(elq.optimal_alpha(v, torch.zeros(5))) == 0.0
    assert float(elq.optimal_alpha(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -1.0]))) == 0.0


def test_bad_settings():
    with pytest.raises(ConfigError, match="elq.kind"):
        elq.solve(torch.ones(3), "quaternary")
    with pytest.raises(ConfigError, match="elq.lam"):
        elq.target(torch.ones(3), torch.ones(3), 0.0)
