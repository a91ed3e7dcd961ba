"""One entry point: per-layer Hessian sensitivity and the resulting per-layer bits.

Methods (see the modules they call for the equations):

* ``hawq_v1``  -- S_i = lambda_i / n_i from the top eigenvalue of each layer's block H_ii
  (power iteration per block on a shared first-order graph); bits from the S_i order under
  the size budget (:func:`.hawq.hawq_v1_bits`: a larger S_i never gets fewer bits), and the
  stage-wise fine-tuning order by Omega_i = lambda_i * ||Q(W_i) - W_i||^2 at those bits,
  descending (:func:`.hawq.hawq_v1_stage_order`; rows carry ``omega`` and ``stage``).
* ``hawq_v2``  -- Tr(H_ii) / n_i from Hutchinson (:mod:`.trace`; ``trace_estimator`` "shared":
  all layers from the same products, or "per_layer": one run per block); bits from the
  allocator with HAWQ-V2's Omega_i(b) = Tr(H_ii) / n_i * ||Q_b(W_i) - W_i||^2.
* ``qbert``    -- per-block Omega = |mean lambda| + std lambda over data subsamples; tiers of
  2/3/4 bits (:mod:`.qbert`). Blocks are given by a regex whose first capture group names
  the block (e.g. ``.*encoder\\.layer\\.(\\d+)\\..*``); without one each layer is a block.

No Lightning here; :mod:`qtrain.callbacks.hessian_sensitivity` schedules it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qtrain.hessian.allocation import allocate_bits
from qtrain.hessian.eigen import top_eigenvalues
from qtrain.hessian.hawq import hawq_v1_bits, hawq_v1_omega, hawq_v1_stage_order, omega_table
from qtrain.hessian.hvp import HessianOperator, batch_losses, hessian_mode, layer_groups
from qtrain.hessian.qbert import assign_tier_bits, block_eigenvalues, qbert_omega
from qtrain.hessian.trace import TraceResult, hutchinson_traces, per_layer_traces

METHODS = ("hawq_v1", "hawq_v2", "qbert")
ESTIMATORS = ("shared", "per_layer")
DEFAULT_BITS = {"hawq_v1": (2, 3, 4, 8), "hawq_v2": (2, 3, 4, 8), "qbert": (2, 3, 4)}


@dataclass
class SensitivityConfig:
    method: str = "hawq_v2"
    bit_choices: Sequence[int] | None = None  # None: DEFAULT_BITS[method]
    budget_bits: int | None = None  # HAWQ: size budget of the allocated weights, in bits
    average_bits: float | None = None  # ... or as average bits per weight
    ties: Sequence[Sequence[str]] = field(default_factory=list)  # layer names sharing bits
    mode: str = "eval"  # model mode during the analysis: eval / train / keep
    trace_estimator: str = "shared"  # hawq_v2: "shared" products or "per_layer" runs
    tol: float = 0.1  # Hutchinson: relative standard error to reach on every layer
    max_iter: int = 200
    min_iter: int = 10
    eig_max_iter: int = 50
    eig_tol: float = 1e-3
    seed: int = 0
    qbert_blocks: str | None = None
    qbert_subsamples: int = 2
    cache_graph: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"hessian.method={self.method!r}; allowed: {METHODS}")
        self.bit_choices = tuple(self.bit_choices or DEFAULT_BITS[self.method])
        if self.trace_estimator not in ESTIMATORS:
            raise ValueError(
                f"hessian.trace_estimator={self.trace_estimator!r}; allowed: {ESTIMATORS}"
            )
        if self.method != "qbert" and (self.budget_bits is None) == (self.average_bits is None):
            raise ValueError(
                f"hessian.method={self.method!r} needs exactly one of budget_bits or "
                f"average_bits (got {self.budget_bits!r}, {self.average_bits!r})"
            )


def _warn_unconverged(runs: dict[str, TraceResult], tol: float) -> None:
    bad = {n: r.rel_stderr()[n] for n, r in runs.items() if r.rel_stderr()[n] > tol}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1])[:5]
        warnings.warn(
            f"Hutchinson traces did not reach relative standard error {tol} for {len(bad)} "
            f"layer(s) within max_iter (worst: "
            + ", ".join(f"{n}={v:.2f}" for n, v in worst)
            + "); raise max_iter or use trace_estimator='per_layer'",
            stacklevel=3,
        )


def qbert_block_of(names: Sequence[str], pattern: str | None) -> dict[str, str]:
    """Layer -> block id (the regex's first capture group, or the layer itself)."""
    if pattern is None:
        return {n: n for n in names}
    rx = re.compile(pattern)
    if rx.groups < 1:
        raise ValueError(f"hessian.qbert_blocks={pattern!r} needs one capture group")
    out = {}
    for n in names:
        m = rx.fullmatch(n)
        if m is None:
            raise ValueError(f"hessian.qbert_blocks={pattern!r} does not match layer {n!r}")
        out[n] = m.group(1)
    return out


def analyze(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence,
    loss: Callable[[nn.Module, object], torch.Tensor],
    cfg: SensitivityConfig,
    root: nn.Module | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Per-layer table rows and chosen bits for the weights of ``layer_names``.

    ``loss(model, batch)`` is evaluated on ``model``; ``layer_names`` name modules of ``root``
    (default ``model``; the callback passes the LightningModule's network, so names are
    relative to it as in every layer-selection rule)."""
    if not batches:
        raise ValueError("hessian analysis: no calibration batches")
    groups = layer_groups(model if root is None else root, layer_names)
    numel = {n: sum(p.numel() for p in ps) for n, ps in groups.items()}
    weights = {n: ps[0] for n, ps in groups.items()}
    rows = {n: {"layer": n, "numel": numel[n], "method": cfg.method} for n in layer_names}
    with hessian_mode(model, cfg.mode):
        if cfg.method == "qbert":
            blocks = qbert_block_of(layer_names, cfg.qbert_blocks)
            bgroups = {b: [p for n in layer_names if blocks[n] == b for p in groups[n]]
                       for b in dict.fromkeys(blocks.values())}
            k = cfg.qbert_subsamples
            if len(batches) < k:
                raise ValueError(f"Q-BERT: {k} subsamples need >= {k} batches, got {len(batches)}")
            subs = [batch_losses(model, batches[i::k], loss) for i in range(k)]
            eigs = block_eigenvalues(bgroups, subs, cfg.eig_max_iter, cfg.eig_tol, cfg.seed)
            omega = qbert_omega(eigs)
            bbits = assign_tier_bits(omega, cfg.bit_choices)
            bits = {n: bbits[blocks[n]] for n in layer_names}
            for n in layer_names:
                b = blocks[n]
                rows[n].update(block=b, curvature=float(sum(eigs[b]) / k),
                               stderr=float(torch.tensor(eigs[b]).std()), sensitivity=omega[b])
        else:
            op = HessianOperator(groups, batch_losses(model, batches, loss),
                                 cache_graph=cfg.cache_graph)
            if cfg.method == "hawq_v2" and cfg.trace_estimator == "shared":
                res = hutchinson_traces(op, cfg.tol, cfg.max_iter, cfg.min_iter, cfg.seed)
                curv, err = res.traces, res.stderr
                extra = {"iterations": res.iterations, "converged": res.converged}
                _warn_unconverged({n: res for n in layer_names}, cfg.tol)
            elif cfg.method == "hawq_v2":
                runs = per_layer_traces(op, cfg.tol, cfg.max_iter, cfg.min_iter, cfg.seed)
                curv = {n: r.traces[n] for n, r in runs.items()}
                err = {n: r.stderr[n] for n, r in runs.items()}
                extra = {}
                _warn_unconverged(runs, cfg.tol)
            else:
                curv, err, extra = {}, {}, {}
                for n in layer_names:
                    e = top_eigenvalues(op, 1, cfg.eig_max_iter, cfg.eig_tol, cfg.seed, group=n)
                    curv[n], err[n] = e.values[0], float("nan")
            total = sum(numel.values())
            budget = cfg.budget_bits if cfg.budget_bits is not None else int(
                cfg.average_bits * total)
            if cfg.method == "hawq_v1":
                sens = {n: curv[n] / numel[n] for n in layer_names}
                bits = hawq_v1_bits(sens, numel, budget, cfg.bit_choices, cfg.ties)
                omega = hawq_v1_omega(curv, weights, bits)
                for i, stage in enumerate(hawq_v1_stage_order(omega, cfg.ties)):
                    for n in stage:
                        rows[n]["stage"] = i
            else:
                table = omega_table(curv, weights, cfg.bit_choices)
                bits = allocate_bits(table, numel, budget, cfg.bit_choices, cfg.ties).bits
                omega = {n: table[n][bits[n]] for n in layer_names}
            for n in layer_names:
                rows[n].update(curvature=curv[n], stderr=err[n],
                               sensitivity=curv[n] / numel[n],
                               omega=omega[n], **extra)
    for n in layer_names:
        rows[n]["bits"] = bits[n]
    return [rows[n] for n in layer_names], bits
