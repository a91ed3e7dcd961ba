"""Q-BERT block sensitivity and mixed 2/3/4-bit assignment (Shen et al. 2019, sec. 3.1).

Omega_i = |mean(lambda_i)| + std(lambda_i), where lambda_i is the top eigenvalue of block
i's Hessian (power iteration) computed separately on each of several data subsamples; the
std term penalises blocks whose curvature varies across the data (the paper's fix for
SQuAD, where eigenvalues of some layers are negative or unstable).

Bit assignment (the paper reports mixed settings but gives no closed rule; ours): sort
blocks by Omega descending and split them into ``len(bit_choices)`` tiers of (near-)equal
size (``numpy.array_split``); the most sensitive tier gets the most bits. With the default
``(4, 3, 2)`` the top third of blocks get 4 bits, the middle third 3 bits, the rest 2 bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qtrain.hessian.eigen import top_eigenvalues
from qtrain.hessian.hvp import HessianOperator, LossFn


def block_eigenvalues(
    groups: Mapping[str, Sequence[torch.Tensor]],
    subsamples: Sequence[Sequence[LossFn]],
    max_iter: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Top eigenvalue of each block's Hessian H_ii on each data subsample (a list of batches).

    Must run inside :func:`qtrain.hessian.hvp.hessian_mode`.
    """
    if len(subsamples) < 2:
        raise ValueError(
            f"Q-BERT: need at least 2 data subsamples for the std term, got {len(subsamples)}"
        )
    out: dict[str, list[float]] = {n: [] for n in groups}
    for k, losses in enumerate(subsamples):
        op = HessianOperator(groups, losses)
        for n in groups:
            out[n].append(top_eigenvalues(op, 1, max_iter, tol, seed + k, group=n).values[0])
    return out


def qbert_omega(eigs: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Omega = |mean(lambda)| + std(lambda) (population std over the subsamples)."""
    return {n: abs(float(np.mean(v))) + float(np.std(v)) for n, v in eigs.items()}


def assign_tier_bits(omega: Mapping[str, float], bit_choices: Sequence[int] = (4, 3, 2)):
    """Equal-size tiers by descending Omega; the top tier gets ``max(bit_choices)`` bits."""
    choices = sorted({int(b) for b in bit_choices}, reverse=True)
    if not choices:
        raise ValueError("Q-BERT: bit_choices is empty")
    order = sorted(omega, key=lambda n: omega[n], reverse=True)
    bits = {}
    for b, tier in zip(choices, np.array_split(np.arange(len(order)), len(choices))):
        for i in tier:
            bits[order[i]] = b
    return bits
