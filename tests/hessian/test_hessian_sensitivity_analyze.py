"""analyze(): HAWQ V1 eigenvalues / V2 traces of each layer vs the exact Hessian blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qtrain.hessian.allocation import allocate_bits
from qtrain.hessian.hawq import omega_table
from qtrain.hessian.sensitivity import SensitivityConfig, analyze
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    names = ("0.weight", "2.weight")
    ps = dict(model.named_parameters())

    def f(w0, w2):
        return F.cross_entropy(functional_call(model, {names[0]: w0, names[1]: w2}, (x,)), y)

    h = torch.autograd.functional.hessian(f, (ps[names[0]].detach(), ps[names[1]].detach()))
    blocks = {"0": h[0][0].reshape(20, 20), "2": h[1][1].reshape(15, 15)}
    return model, [(x, y)], blocks


def ce(m, b):
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("estimator", ["shared", "per_layer"])
def test_hawq_v2_traces_match_exact_blocks(estimator):
    model, batches, blocks = setup()
    cfg = SensitivityConfig("hawq_v2", average_bits=4.0, tol=0.03, max_iter=4000,
                            trace_estimator=estimator)
    rows, bits = analyze(model, ["0", "2"], batches, ce, cfg)
    for r in rows:
        exact = blocks[r["layer"]].trace().item()
        assert abs(r["curvature"] - exact) <= 4 * r["stderr"], (r, exact)
        assert r["sensitivity"] == pytest.approx(r["curvature"] / r["numel"])
    # bits are the allocator's optimum for the estimated traces
    w = {"0": model[0].weight, "2": model[2].weight}
    table = omega_table({r["layer"]: r["curvature"] for r in rows}, w, cfg.bit_choices)
    expect = allocate_bits(table, {"0": 20, "2": 15}, int(4.0 * 35), cfg.bit_choices).bits
    assert bits == expect


def test_hawq_v1_block_eigenvalues_exact():
    model, batches, blocks = setup()
    cfg = SensitivityConfig("hawq_v1", budget_bits=35 * 8, eig_max_iter=2000, eig_tol=1e-10)
    rows, bits = analyze(model, ["0", "2"], batches, ce, cfg)
    for r in rows:
        ev = torch.linalg.eigvalsh(blocks[r["layer"]])
        assert r["curvature"] == pytest.approx(ev[ev.abs().argmax()].item(), rel=1e-4)
    assert bits == {"0": 8, "2": 8}  # budget allows all-8 and Omega decreases with bits
