"""The size-vs-accuracy Pareto frontier of a set of runs (pure; no plotting, no files).

A run ``p`` is *dominated* by ``q`` when ``q`` is no larger and no worse, and strictly better in
one of the two: ``size_q <= size_p``, ``score_q >= score_p`` (``<=`` for a lower-is-better
metric such as perplexity) and ``(size_q, score_q) != (size_p, score_p)``. The frontier is the
set of runs no other run dominates; identical points do not dominate each other, so both stay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LOWER_IS_BETTER = frozenset({"ppl", "loss"})  # task metrics where smaller is better


def higher_is_better(metric: str | None) -> bool:
    return metric not in LOWER_IS_BETTER


def pareto_front(sizes: Sequence[float], scores: Sequence[float],
                 maximize: bool = True) -> list[int]:
    """Indices of the non-dominated points, ordered by size (then best score first).

    One sort and one sweep, O(n log n): after sorting by (size ascending, score best first),
    a point is on the frontier iff its score is strictly better than every score at a strictly
    smaller size, and as good as the best score at its own size. NaN points are never on it.
    """
    if len(sizes) != len(scores):
        raise ValueError(f"pareto_front: {len(sizes)} sizes but {len(scores)} scores")
    sign = 1.0 if maximize else -1.0
    pts = [(float(s), sign * float(a), i) for i, (s, a) in enumerate(zip(sizes, scores))
           if not (math.isnan(float(s)) or math.isnan(float(a)))]
    pts.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[int] = []
    best_smaller = -math.inf  # best score over strictly smaller sizes
    k = 0
    while k < len(pts):
        size, top = pts[k][0], pts[k][1]  # first of this size group has its best score
        j = k
        while j < len(pts) and pts[j][0] == size:
            if pts[j][1] == top and top > best_smaller:
                front.append(pts[j][2])
            j += 1
        best_smaller = max(best_smaller, top)
        k = j
    return front
