"""HAWQ sensitivities: V1 top-eigenvalue ordering and V2 trace-weighted perturbation.

* HAWQ (V1, Dong et al. 2019, sec. 3.2): blocks are ordered by S_i = lambda_i / n_i, the
  top Hessian eigenvalue of block i divided by its parameter count; more sensitive blocks
  get more bits. The paper then hand-picks the bits along that order; here (a documented
  simplification) the bits come from the same exact size-budget allocator as V2 with
  Omega_i(b) = lambda_i / n_i * ||Q_b(W_i) - W_i||^2.
* HAWQ-V2 (Dong et al. 2020, eq. 6): Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||_2^2,
  with Tr(H_i) from Hutchinson (:mod:`qtrain.hessian.trace`).

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


def omega_table(
    curvature: Mapping[str, float],
    weights: Mapping[str, torch.Tensor],
    bit_choices: Sequence[int],
) -> dict[str, dict[int, float]]:
    """Omega_i(b) = curvature_i / n_i * ||Q_b(W_i) - W_i||^2 for every layer and width.

    ``curvature`` is Tr(H_i) (HAWQ-V2) or lambda_i (HAWQ V1 allocation, see module doc).
    """
    out: dict[str, dict[int, float]] = {}
    for n, c in curvature.items():
        if n not in weights:
            raise ValueError(f"HAWQ: no weight given for layer {n!r}")
        w = weights[n]
        out[n] = {b: float(c) / w.numel() * quantization_perturbation(w, b) for b in bit_choices}
    return out
