"""Hutchinson trace estimates of per-layer Hessian blocks, from shared Hessian-vector products.

Hutchinson 1990: for a Rademacher vector v (entries +-1 with probability 1/2),
E[v^T A v] = Tr(A). HAWQ-V2 (Dong et al. 2020, eq. 5) and PyHessian (Yao et al. 2020,
Alg. 2) need Tr(H_ll) for every layer l. PyHessian's route is one Hutchinson run per layer
(a Hessian restricted to that layer). Here every layer's estimate comes from the **same**
full-model products: with v = (v_1, ..., v_L) Rademacher over all layers,

    v_l^T (H v)_l = v_l^T H_ll v_l + sum_{k != l} v_l^T H_lk v_k,

and since v_l is independent of v_k with zero mean, the cross terms have expectation 0, so
v_l^T (Hv)_l is an unbiased estimate of Tr(H_ll) (cross terms only add variance). One
product per iteration then updates all L estimates; iterations run until every layer's
running relative standard error ``stderr / |mean|`` is at most ``tol`` (or ``max_iter``).

:func:`per_layer_traces` is the PyHessian-style baseline (one run per layer on H_ll alone),
used by the tests and ``benchmarks/bench_hessian.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qtrain.hessian.hvp import HessianOperator


def rademacher(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Independent +-1 tensors shaped like ``params`` (drawn on the generator's device)."""
    dev = generator.device
    return [
        (torch.randint(0, 2, p.shape, generator=generator, device=dev) * 2 - 1)
        .to(device=p.device, dtype=p.dtype)
        for p in params
    ]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


@dataclass
class TraceResult:
    """Per-group trace estimates: ``traces[name]``, ``stderr[name]`` and the raw samples."""

    traces: dict[str, float]
    stderr: dict[str, float]
    iterations: int
    converged: bool
    samples: torch.Tensor = field(repr=False)  # (iterations, groups), float64
    products: int = 0  # Hessian-vector products used

    def rel_stderr(self) -> dict[str, float]:
        return {n: self.stderr[n] / max(abs(t), 1e-300) for n, t in self.traces.items()}


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum().double() for x, y in zip(a, b)]).sum()


def _summary(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = samples.shape[0]
    mean = samples.mean(0)
    if n < 2:
        return mean, torch.full_like(mean, float("inf"))
    return mean, samples.std(0, unbiased=True) / n**0.5


def _check(tol: float, max_iter: int, min_iter: int) -> None:
    if not tol > 0:
        raise ValueError(f"Hutchinson: tol must be > 0 (relative standard error), got {tol}")
    if not (isinstance(max_iter, int) and isinstance(min_iter, int) and 2 <= min_iter <= max_iter):
        raise ValueError(
            f"Hutchinson: need integers 2 <= min_iter <= max_iter, got {min_iter}, {max_iter}"
        )


def hutchinson_traces(
    op: HessianOperator,
    tol: float = 0.05,
    max_iter: int = 500,
    min_iter: int = 10,
    seed: int = 0,
    group: str | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Shared-sample Hutchinson estimates of Tr(H_ll) for every group of ``op``.

    Stops after iteration t >= ``min_iter`` once max_l stderr_l / |mean_l| <= ``tol``, or at
    ``max_iter`` (then ``converged`` is False). With ``group`` set, the run uses only that
    group's diagonal block H_gg (the per-layer baseline) and returns one entry.
    Must run inside :func:`qtrain.hessian.hvp.hessian_mode`.
    """
    _check(tol, max_iter, min_iter)
    gen = generator or make_generator(seed, op.params[0].device)
    names = op.names if group is None else [group]
    params = op.params if group is None else op.params[op._slice(group)]
    rows: list[torch.Tensor] = []
    mean = m2 = None  # Welford running mean / sum of squared deviations, per group
    converged = False
    start = op.n_products
    for t in range(1, max_iter + 1):
        v = rademacher(params, gen)
        hv = op.hvp(v, group=group)
        x = op.group_dots(v, hv) if group is None else _dot(v, hv)[None]
        rows.append(x)
        if mean is None:
            mean, m2 = x.clone(), torch.zeros_like(x)
        else:
            d = x - mean
            mean += d / t
            m2 += d * (x - mean)
        if t >= min_iter and bool((m2 / (t - 1) / t <= (tol * mean) ** 2).all()):
            converged = True
            break
    samples = torch.stack(rows).cpu()
    mean, se = _summary(samples)
    return TraceResult(
        traces={n: float(m) for n, m in zip(names, mean)},
        stderr={n: float(s) for n, s in zip(names, se)},
        iterations=samples.shape[0],
        converged=converged,
        samples=samples,
        products=op.n_products - start,
    )


def per_layer_traces(
    op: HessianOperator, tol: float = 0.05, max_iter: int = 500, min_iter: int = 10,
    seed: int = 0,
) -> dict[str, TraceResult]:
    """Baseline: one Hutchinson run per group on its own block H_ll (PyHessian's approach)."""
    gen = make_generator(seed, op.params[0].device)
    return {
        n: hutchinson_traces(op, tol, max_iter, min_iter, group=n, generator=gen)
        for n in op.names
    }
