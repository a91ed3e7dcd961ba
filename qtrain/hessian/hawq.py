"""HAWQ sensitivities: V1 eigenvalue ordering and V2 trace-weighted perturbation.

* HAWQ (V1, Dong et al. 2019, sec. 3.2): blocks are ordered by S_i = lambda_i / n_i, the
  top Hessian eigenvalue of block i divided by its parameter count, and a block with a
  larger S_i never gets fewer bits than one with a smaller S_i. The paper gives the order
  and picks the widths by hand along it; :func:`hawq_v1_bits` turns the order into widths
  under a size budget with one deterministic rule (stated there): precision is handed out
  strictly in S order, each block the widest choice that still lets every later block take
  the narrowest one. The quantization perturbation plays no part in V1's precision.
  Stage-wise fine-tuning (sec. 3.3): blocks are quantized and fine-tuned one stage at a time
  in descending order of Omega_i = lambda_i * ||Q(W_i) - W_i||_2^2 (Q at the block's bits;
  no division by n_i): :func:`hawq_v1_omega`, :func:`hawq_v1_stage_order`.
* HAWQ-V2 (Dong et al. 2020, eq. 6): Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||_2^2,
  with Tr(H_i) from Hutchinson (:mod:`qtrain.hessian.trace`); bits from the exact
  size-budget allocator (:mod:`qtrain.hessian.allocation`).

Q_b is uniform symmetric per-output-channel min-max quantization at b bits
(:func:`qtrain.quant.uniform.fake_quantize_tensor`, granularity 'channel', axis 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from qtrain.quant.uniform import fake_quantize_tensor


@torch.no_grad()
def quantization_perturbation(weight: torch.Tensor, bits: int) -> float:
    """||Q_b(W) - W||_2^2 for per-channel symmetric uniform quantization at ``bits``."""
    w = weight.detach().float()
    q = fake_quantize_tensor(w, bits, symmetric=True, granularity="channel", axis=0)
    return float(((q - w) ** 2).sum())


def hawq_v1_order(eigenvalues: Mapping[str, float], numel: Mapping[str, int]) -> list[str]:
    """Layer names sorted by lambda_i / n_i, most sensitive first (HAWQ, sec. 3.2)."""
    return sorted(eigenvalues, key=lambda n: eigenvalues[n] / numel[n], reverse=True)


def _items(names: Sequence[str], ties: Sequence[Sequence[str]] | None) -> list[list[str]]:
    from qtrain.hessian.allocation import _groups

    return _groups(list(names), ties)


def hawq_v1_bits(
    sensitivity: Mapping[str, float],
    numel: Mapping[str, int],
    budget_bits: int,
    bit_choices: Sequence[int] = (2, 3, 4, 8),
    ties: Sequence[Sequence[str]] | None = None,
) -> dict[str, int]:
    """HAWQ V1 precision (Dong et al. 2019, sec. 3.2) from S_i = lambda_i / n_i.

    Rule: sort the blocks by S_i, largest first (a tie group -- layers that must share one
    width -- is one item ranked by its largest S_i, with n = the sum of its n_i; equal S keep
    the given order). Walk that order and give each item the widest bit choice b, no wider
    than the previous item's, such that ``sum(n * b)`` of the items so far plus the narrowest
    choice for every later item stays within ``budget_bits``. Hence a block with a larger S_i
    never gets fewer bits than one with a smaller S_i, the size never exceeds the budget, and
    among all assignments with both properties this one is the first in S order
    (lexicographically widest): the most sensitive blocks get the precision first.
    """
    choices = sorted({int(b) for b in bit_choices}, reverse=True)
    if not choices or choices[-1] < 1:
        raise ValueError(f"HAWQ V1: bit_choices must be positive ints, got {bit_choices}")
    names = list(sensitivity)
    if not names:
        raise ValueError("HAWQ V1: no layers given")
    for n in names:
        if n not in numel or int(numel[n]) < 1:
            raise ValueError(f"HAWQ V1: numel of layer {n!r} missing or not positive")
    items = _items(names, ties)
    key = [max(float(sensitivity[n]) for n in g) for g in items]
    size = [sum(int(numel[n]) for n in g) for g in items]
    order = sorted(range(len(items)), key=lambda i: -key[i])  # stable: equal S keep order
    lo = choices[-1]
    rest = lo * sum(size)
    if int(budget_bits) < rest:
        raise ValueError(f"HAWQ V1: size budget {int(budget_bits)} bits is below the "
                         f"all-{lo}-bit size {rest} bits of the {len(names)} allocated layers")
    used, cap, bits = 0, choices[0], {}
    for i in order:
        rest -= lo * size[i]
        b = next(c for c in choices if c <= cap and used + size[i] * c + rest <= budget_bits)
        used += size[i] * b
        cap = b
        for n in items[i]:
            bits[n] = b
    return {n: bits[n] for n in names}


def hawq_v1_omega(eigenvalues: Mapping[str, float], weights: Mapping[str, torch.Tensor],
                  bits: Mapping[str, int]) -> dict[str, float]:
    """Omega_i = lambda_i * ||Q_{b_i}(W_i) - W_i||_2^2 (HAWQ sec. 3.3) at each block's bits."""
    return {n: float(lam) * quantization_perturbation(weights[n], int(bits[n]))
            for n, lam in eigenvalues.items()}


def hawq_v1_stage_order(omega: Mapping[str, float],
                        ties: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Fine-tuning stages (HAWQ sec. 3.3): blocks in descending Omega_i, one per stage (a tie
    group is one stage, ranked by the sum of its members' Omega)."""
    items = _items(list(omega), ties)
    return sorted(items, key=lambda g: -sum(omega[n] for n in g))


def omega_table(
    curvature: Mapping[str, float],
    weights: Mapping[str, torch.Tensor],
    bit_choices: Sequence[int],
) -> dict[str, dict[int, float]]:
    """Omega_i(b) = curvature_i / n_i * ||Q_b(W_i) - W_i||^2 for every layer and width.

    ``curvature`` is Tr(H_i) (HAWQ-V2).
    """
    out: dict[str, dict[int, float]] = {}
    for n, c in curvature.items():
        if n not in weights:
            raise ValueError(f"HAWQ: no weight given for layer {n!r}")
        w = weights[n]
        out[n] = {b: float(c) / w.numel() * quantization_perturbation(w, b) for b in bit_choices}
    return out
