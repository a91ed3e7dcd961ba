"""The no-cross-terms bound of benchmarks/hessian_variance_study.py, worked by hand."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bound_no_cross_terms_hand_worked(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("hvs", BENCH / "hessian_variance_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.pop("hvs", None)
    res = {"tol": 0.1, "shared_s_per_product": 0.2, "projected_loop_s": 60.0,
           "rows": [{"loop_rel_std": 0.5}, {"loop_rel_std": 1.0}]}
    # worst layer r = 1.0: (1.0 / 0.1)^2 = 100 full products x 0.2 s = 20 s; 60 / 20 = 3x
    out = mod.bound_no_cross_terms(res)
    assert out["projected_shared_no_cross_terms_s"] == pytest.approx(20.0)
    assert out["max_gain_of_shared_over_loop"] == pytest.approx(3.0)
