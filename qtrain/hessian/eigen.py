"""Top Hessian eigenvalues by power iteration with deflation.

HAWQ (Dong et al. 2019, sec. 3.1, Alg. 1) and Q-BERT (Shen et al. 2019, sec. 3.1) use the
top eigenvalue of each block's Hessian, obtained by power iteration on Hessian-vector
products: v <- Hv / ||Hv||, lambda = v^T H v, stopping when the relative change of lambda
is below ``tol``. Further eigenvalues (as PyHessian's ``eigenvalues(top_n)``) use projection
deflation: each iterate is orthogonalised against the eigenvectors already found, so the
iteration converges to the dominant eigenpair of H restricted to their orthogonal
complement. Power iteration finds the eigenvalue of largest **magnitude** (a large negative
eigenvalue wins over a smaller positive one), as in the papers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qtrain.hessian.hvp import HessianOperator
from qtrain.hessian.trace import make_generator


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = float(_dot(v, v)) ** 0.5
    if n == 0.0:
        return v
    return [x / n for x in v]


def _orthogonalize(v: list[torch.Tensor], basis: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for u in basis:  # modified Gram-Schmidt
        c = float(_dot(v, u))
        v = [x - c * y for x, y in zip(v, u)]
    return v


@dataclass
class EigenResult:
    values: list[float]
    vectors: list[list[torch.Tensor]]
    iterations: list[int]
    converged: list[bool]


def top_eigenvalues(
    op: HessianOperator,
    top_k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    group: str | None = None,
) -> EigenResult:
    """The ``top_k`` largest-magnitude eigenvalues of H (or of the block H_gg for ``group``).

    Must run inside :func:`qtrain.hessian.hvp.hessian_mode`.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_eigenvalues: top_k must be an int >= 1, got {top_k!r}")
    if not tol > 0 or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"top_eigenvalues: need tol > 0 and max_iter >= 1, got {tol}, {max_iter}")
    params = op.params if group is None else op.params[op._slice(group)]
    gen = make_generator(seed, params[0].device)
    values, vectors, iters, conv = [], [], [], []
    for _ in range(top_k):
        v = [torch.randn(p.shape, generator=gen, device=gen.device).to(p) for p in params]
        v = _normalize(_orthogonalize(v, vectors))
        lam, done, it = None, False, 0
        for it in range(1, max_iter + 1):  # noqa: B007 (count used after the loop)
            hv = op.hvp(v, group=group)
            new = float(_dot(hv, v))
            v = _normalize(_orthogonalize(hv, vectors))
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam, done = new, True
                break
            lam = new
        values.append(lam)
        vectors.append(v)
        iters.append(it)
        conv.append(done)
    return EigenResult(values, vectors, iters, conv)
