"""Exact mixed-precision bit allocation under a model-size budget (HAWQ-V2/V3 style).

Problem (HAWQ-V3, Yao et al. 2021, eq. 8, with the size constraint only; HAWQ-V2 Dong et
al. 2020, sec. 3.3 picks the same point from its Pareto frontier):

    minimise   sum_i Omega_i(b_i)      over b_i in the allowed bit choices
    subject to sum_i n_i * b_i <= budget_bits,

where ``ties`` force several layers to share one bit width (HAWQ-V3 ties a residual
block's downsample conv to its main path). A tied group is one item with
n = sum n_i and Omega(b) = sum Omega_i(b).

Solver: dynamic programming over the used size in units of u = gcd of all item costs
n_g * b (a multiple-choice knapsack; exact, O(groups * choices * budget/u)). When that
table would exceed ``max_states`` the same problem is solved as an integer linear program
with ``scipy.optimize.milp`` (HiGHS, exact branch and bound). Either way the result is a
provable optimum, which the tests check against brute force.

The size counts the weight codes (n_i * b_i bits) of the allocated layers only; scales,
biases and layers outside the allocation are constant and left out of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Allocation:
    bits: dict[str, int]
    objective: float
    size_bits: int
    budget_bits: int
    solver: str


def _groups(
    names: Sequence[str], ties: Sequence[Sequence[str]] | None
) -> list[list[str]]:
    seen: dict[str, int] = {}
    groups: list[list[str]] = []
    for tie in ties or ():
        tie = list(tie)
        if len(tie) < 2:
            raise ValueError(f"bit allocation: a tie needs at least two layers, got {tie}")
        for n in tie:
            if n not in names:
                raise ValueError(f"bit allocation: tied layer {n!r} is not among the layers")
            if n in seen:
                raise ValueError(f"bit allocation: layer {n!r} appears in two ties")
            seen[n] = len(groups)
        groups.append(tie)
    groups += [[n] for n in names if n not in seen]
    return groups


def allocate_bits(
    omega: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    budget_bits: int,
    bit_choices: Sequence[int] = (2, 3, 4, 8),
    ties: Sequence[Sequence[str]] | None = None,
    max_states: int = 20_000_000,
) -> Allocation:
    """Optimal per-layer bits: ``omega[layer][b]`` is the sensitivity cost at ``b`` bits."""
    names = list(omega)
    choices = sorted({int(b) for b in bit_choices})
    if not names:
        raise ValueError("bit allocation: no layers given")
    if not choices or choices[0] < 1:
        raise ValueError(f"bit allocation: bit_choices must be positive ints, got {bit_choices}")
    for n in names:
        if n not in numel or int(numel[n]) < 1:
            raise ValueError(f"bit allocation: numel of layer {n!r} missing or not positive")
        missing = [b for b in choices if b not in omega[n]]
        if missing:
            raise ValueError(f"bit allocation: omega[{n!r}] lacks bit widths {missing}")
    groups = _groups(names, ties)
    sizes = [sum(int(numel[n]) for n in g) for g in groups]
    cost = np.array([[s * b for b in choices] for s in sizes], dtype=np.int64)
    val = np.array([[sum(float(omega[n][b]) for n in g) for b in choices] for g in groups])
    minimum = int(cost[:, 0].sum())
    budget = int(budget_bits)
    if budget < minimum:
        raise ValueError(
            f"bit allocation: size budget {budget} bits is below the all-{choices[0]}-bit size "
            f"{minimum} bits of the {len(names)} allocated layers"
        )
    budget = min(budget, int(cost[:, -1].sum()))
    unit = math.gcd(*cost.flatten().tolist())
    states = budget // unit + 1
    if len(groups) * states <= max_states:
        pick, solver = _dp(cost // unit, val, states), "dp"
    else:
        pick, solver = _milp(cost, val, budget), "milp"
    bits = {n: choices[pick[i]] for i, g in enumerate(groups) for n in g}
    size = int(sum(cost[i, pick[i]] for i in range(len(groups))))
    obj = float(sum(val[i, pick[i]] for i in range(len(groups))))
    return Allocation(bits, obj, size, int(budget_bits), solver)


def _dp(cost: np.ndarray, val: np.ndarray, states: int) -> list[int]:
    """Multiple-choice knapsack: best[c] = min objective with total cost exactly c units."""
    g, k = cost.shape
    best = np.full(states, np.inf)
    best[0] = 0.0
    choice = np.zeros((g, states), dtype=np.int8)
    for i in range(g):
        new = np.full(states, np.inf)
        for j in range(k):
            c = int(cost[i, j])
            if c >= states:
                continue
            cand = np.full(states, np.inf)
            cand[c:] = best[: states - c] + val[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise ValueError("bit allocation: no feasible assignment within the budget")
    pick = [0] * g
    for i in range(g - 1, -1, -1):
        pick[i] = int(choice[i, c])
        c -= int(cost[i, pick[i]])
    return pick


def _milp(cost: np.ndarray, val: np.ndarray, budget: int) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    g, k = cost.shape
    one_hot = np.kron(np.eye(g), np.ones(k))  # each group picks exactly one width
    cons = [
        LinearConstraint(one_hot, 1, 1),
        LinearConstraint(cost.reshape(1, -1).astype(float), -np.inf, float(budget)),
    ]
    res = milp(val.reshape(-1), constraints=cons, integrality=np.ones(g * k),
               bounds=Bounds(0, 1))
    if not res.success:
        raise ValueError(f"bit allocation: ILP failed ({res.message})")
    return [int(np.argmax(r)) for r in res.x.reshape(g, k)]
