"""Hydra sweep syntax -> Optuna distributions, and the objective of a finished run.

Used by the ``qtrain_optuna`` Hydra sweeper (``hydra_plugins/qtrain_optuna_sweeper``;
``python train.py -m hparams_search=<name>``). A search parameter is written in Hydra's own
override grammar, on the command line or under ``hydra.sweeper.params``:

- ``choice(2,3,4,8)``                      -> ``CategoricalDistribution``
- ``range(2,9)`` / ``range(2,9,2)``        -> ``IntDistribution`` (end excluded, as Hydra)
- ``interval(1e-4,1e-1)``                  -> ``FloatDistribution``
- ``int(interval(2,8))``                   -> ``IntDistribution`` (both ends included)
- ``tag(log, interval(1e-4,1e-1))``        -> the same on a log scale

The objective values are read from the job's ``summary.json`` (what ``train.py`` writes for
every run): e.g. ``quant_metric`` (test metric of the quantized model), ``quant_mb`` (its
size by storage bits), ``compression``. A size budget is an Optuna constraint (``value -
budget <= 0`` is feasible), so samplers that support constraints (TPE, NSGA-II) steer away
from over-budget points and ``best_trial(s)`` are chosen among the feasible ones.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from qtrain.errors import ConfigError

DIRECTIONS = ("maximize", "minimize")


def distribution(key: str, override) -> Any:
    """The Optuna distribution of one parsed Hydra sweep override (``key`` for errors)."""
    import optuna.distributions as D
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    v = override.value()
    if isinstance(v, ChoiceSweep):
        return D.CategoricalDistribution(list(v.list))
    if isinstance(v, RangeSweep):
        if v.shuffle:
            raise ConfigError(f"hydra.sweeper.params.{key}: shuffle(range(...)) is not a search "
                              "space; write range(start, stop[, step])")
        start, stop, step = v.start, v.stop, v.step
        if all(float(x).is_integer() for x in (start, stop, step)):
            start, stop, step = int(start), int(stop), int(step)
            last = start + (math.ceil((stop - start) / step) - 1) * step
            if step <= 0 or last < start:
                raise ConfigError(f"hydra.sweeper.params.{key}: empty range({start},{stop},{step})")
            return D.IntDistribution(start, last, step=step)
        values, x = [], float(start)
        while x < stop:
            values.append(x)
            x += step
        return D.CategoricalDistribution(values)
    if isinstance(v, IntervalSweep):
        log = "log" in v.tags
        if isinstance(v.start, int) and isinstance(v.end, int):
            return D.IntDistribution(v.start, v.end, log=log)
        return D.FloatDistribution(float(v.start), float(v.end), log=log)
    raise ConfigError(f"hydra.sweeper.params.{key}={override.input_line!r}: not a search space; "
                      "allowed: choice(...), range(...), interval(a,b), int(interval(a,b)), "
                      "tag(log, interval(a,b))")


def split_arguments(arguments: list[str], params: dict[str, str]) -> tuple[dict, list[str]]:
    """(search space ``{key: distribution}``, fixed overrides) from the command line and the
    config's ``params`` (the command line wins for a key given in both)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for ov in parser.parse_overrides(lines) + parser.parse_overrides(list(arguments)):
        key = ov.get_key_element()
        if ov.is_sweep_override():
            space[key] = distribution(key, ov)
            fixed.pop(key, None)
        else:
            fixed[key] = f"{key}={ov.get_value_element_as_str()}"
            space.pop(key, None)
    return space, list(fixed.values())


def _split_items(items, sep: str, key: str, form: str) -> dict[str, str]:
    """``["a<sep>b", ...]`` -> ``{a: b}`` (one ConfigError naming ``hydra.sweeper.<key>``)."""
    pairs = [str(x).split(sep, 1) for x in items]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"hydra.sweeper.{key}={list(items)}: write each as {form}")
    return {k.strip(): v.strip() for k, v in pairs}


def check_objectives(objectives: dict[str, str] | list[str]) -> dict[str, str]:
    """``{key: direction}`` from a dict or a list of ``"key:direction"`` (a list replaces the
    config's objectives on the command line: ``'hydra.sweeper.objectives=[quant_mb:minimize]'``;
    a dict override would be merged into them)."""
    if isinstance(objectives, (list, tuple)):
        objectives = _split_items(objectives, ":", "objectives",
                                  "'<summary key>:maximize' or '<summary key>:minimize'")
    if not objectives:
        raise ConfigError("hydra.sweeper.objectives: give at least one summary key and its "
                          "direction, e.g. {quant_metric: maximize}")
    for k, d in objectives.items():
        if d not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.objectives.{k}={d!r}; allowed: {DIRECTIONS}")
    return dict(objectives)


def read_summary(job_dir: str) -> dict | None:
    """The job's ``summary.json`` (None when the run wrote none: failed or stopped)."""
    path = os.path.join(job_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def objective_values(summary: dict, objectives: dict[str, str]) -> list[float]:
    out = []
    for key in objectives:
        v = summary.get(key)
        if v is None:
            raise ConfigError(f"hydra.sweeper.objectives: the run summary has no value for "
                              f"{key!r}; numeric keys it has: "
                              f"{sorted(k for k, x in summary.items() if isinstance(x, (int, float)))}")
        out.append(float(v))
    return out


def check_constraints(constraints: dict | list | None) -> dict[str, float]:
    """``{key: upper bound}`` from a dict or a list of ``"key<=bound"`` (list: replaces the
    config's constraints on the command line, e.g. ``"hydra.sweeper.constraints=['quant_mb<=0.05']"``)."""
    if isinstance(constraints, (list, tuple)):
        constraints = _split_items(constraints, "<=", "constraints",
                                   "'<summary key><=<bound>', e.g. quant_mb<=0.05")
    out = {}
    for k, b in (constraints or {}).items():
        try:
            out[k] = float(b)
        except (TypeError, ValueError):
            raise ConfigError(f"hydra.sweeper.constraints.{k}={b!r}: the bound must be a "
                              "number") from None
    return out
