"""Incremental Network Quantization (Zhou et al. 2017, ICLR), tensor math.

Levels: :func:`qtrain.quant.pow2.inq_levels` (eq. 2-3: s = max|W|, n1 = floor(log2(4s/3)),
n2 = n1 + 1 - 2^(b-1)/2, P = {0} U {+-2^k, n2 <= k <= n1}) and nearest-level rounding
(:func:`qtrain.quant.pow2.round_to_levels`, eq. 4). The levels of a layer are computed once,
from the weight at the first partition, and kept for all later stages.

Weight partition (sec. 2.2, eq. 5-6): at stage t an *accumulated* portion sigma_t of the
weights of every layer is frozen at its level; the rest keeps training (eq. 7: frozen
weights get zero update). "Pruning-inspired" partition: the largest |w| among the still
free weights are frozen first; ``'random'`` draws them uniformly. Masks only grow.

Accumulated portions (sec. 3.1 / 3.4 of the paper): ResNet / 5-bit {0.5, 0.75, 0.875, 1};
4-bit {0.3, 0.5, 0.8, 0.9, 0.95, 1}; 3-bit {0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1}.
The '2bit' schedule below is recalled from the paper's ternary experiment and was not
re-verified against its table (approximate).
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.quant.pow2 import inq_levels, round_to_levels

SCHEDULES = {
    "5bit": [0.5, 0.75, 0.875, 1.0],
    "4bit": [0.3, 0.5, 0.8, 0.9, 0.95, 1.0],
    "3bit": [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
    "2bit": [0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0],  # ~ approximate
}
STRATEGIES = ("magnitude", "random")

__all__ = ["SCHEDULES", "STRATEGIES", "check_schedule", "grow_mask", "inq_levels",
           "round_to_levels"]


def check_schedule(schedule) -> list[float]:
    """Resolve a schedule name or list; must be strictly increasing in (0, 1] and end at 1."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ConfigError(f"inq.schedule={schedule!r}; allowed names: {sorted(SCHEDULES)} "
                              "or a list of accumulated portions")
        return list(SCHEDULES[schedule])
    sched = [float(s) for s in schedule]
    ok = sched and all(0 < a < b for a, b in zip(sched, sched[1:])) and 0 < sched[0]
    if not ok or sched[-1] != 1.0:
        raise ConfigError(f"inq.schedule={sched}: accumulated portions must increase strictly "
                          "in (0, 1] and end with 1.0")
    return sched


def grow_mask(weight: torch.Tensor, frozen: torch.Tensor, portion: float,
              strategy: str = "magnitude", generator: torch.Generator | None = None):
    """Frozen mask covering ``round(portion * numel)`` weights, a superset of ``frozen``.

    ``'magnitude'``: the largest |w| among the free weights are added first; ``'random'``:
    uniformly chosen free weights (``generator`` on CPU for reproducibility).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"inq.strategy={strategy!r}; allowed: {STRATEGIES}")
    n = weight.numel()
    target = round(portion * n)
    n_new = target - int(frozen.sum())
    if n_new <= 0:
        return frozen.clone()
    if strategy == "magnitude":
        score = weight.detach().abs().flatten().float()
    else:
        score = torch.rand(n, generator=generator).to(weight.device)
    score = score.masked_fill(frozen.flatten(), -float("inf"))
    idx = score.topk(n_new).indices
    out = frozen.clone().flatten()
    out[idx] = True
    return out.reshape(weight.shape)
