"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``,
so the scripts import this module as ``timing``).

* :func:`interleaved_times`: wall times of several callables run round by round in one
  process, so every variant sees the same machine state; the first ``warmup`` rounds are
  discarded. ``alternate=True`` reverses the order every other round (no variant always
  runs first).
* :func:`medians`: median of each list of times.
* :func:`timed`: one call and its wall time.
* :func:`write_json`: the results file.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def interleaved_times(runs: dict[str, Callable[[], object]], warmup: int, rounds: int, *,
                      alternate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs`` over ``rounds`` rounds after ``warmup`` rounds."""
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for k in (names[::-1] if alternate and r % 2 else names):
            t0 = time.perf_counter()
            runs[k]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def write_json(path: str | Path, data: Any, indent: int) -> None:
    Path(path).write_text(json.dumps(data, indent=indent))
