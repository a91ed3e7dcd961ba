"""Hessian-vector products, power iteration and Hutchinson traces vs exact references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qtrain.hessian.eigen import top_eigenvalues
from qtrain.hessian.hvp import HessianOperator, batch_losses, hessian_mode, layer_groups
from qtrain.hessian.trace import hutchinson_traces, per_layer_traces
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture

NAMES = ("fc1.weight", "fc2.weight")


def small_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(4, 6))
    m.add_module("bn", nn.BatchNorm1d(6))
    m.add_module("act", nn.Tanh())
    m.add_module("fc2", nn.Linear(6, 3))
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def exact_hessian(model, batches, weights=None):
    """Full Hessian of the weighted mean loss w.r.t. fc1.weight, fc2.weight (eval mode)."""
    shapes = [dict(model.named_parameters())[n].shape for n in NAMES]
    sizes = [s.numel() for s in shapes]
    w = weights or [1.0] * len(batches)
    w = [x / sum(w) for x in w]

    def f(flat):
        parts = dict(zip(NAMES, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return sum(wi * ce(lambda x: functional_call(model, parts, (x,)), b)
                   for wi, b in zip(w, batches))

    flat = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in NAMES])
    model.eval()
    return torch.autograd.functional.hessian(f, flat), sizes


def flat(vs):
    return torch.cat([v.flatten() for v in vs])


def test_hvp_equals_exact_hessian_times_v_full_and_block():
    model = small_model().double()
    batches = [tuple(t.double() if t.is_floating_point() else t for t in data(s)) for s in (1, 2)]
    H, sizes = exact_hessian(model, batches, weights=[16, 48])
    groups = layer_groups(model, ["fc1", "fc2"])
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for ps in groups.values() for p in ps]
    with hessian_mode(model, "eval"):
        op = HessianOperator(groups, batch_losses(model, batches, ce), weights=[16, 48])
        hv = op.hvp(v)
        hv_block = op.hvp(v[1:], group="fc2")
        op2 = HessianOperator(groups, batch_losses(model, batches, ce), [16, 48], cache_graph=False)
        hv_nocache = op2.hvp(v)
    ref = H @ flat(v)
    torch.testing.assert_close(flat(hv), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(hv_nocache), ref, rtol=1e-9, atol=1e-12)
    n1 = sizes[0]
    torch.testing.assert_close(flat(hv_block), H[n1:, n1:] @ flat(v[1:]), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(flat(hv_block), ref[n1:])  # cross terms are non-zero here


def quadratic(seed=0, sizes=(5, 7)):
    """L(w) = 1/2 w^T A w over two parameter tensors, A symmetric with known spectrum."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.tensor([9.0, -6.0, 4.0] + [0.3 * i for i in range(n - 3)], dtype=torch.float64)
    A = q @ torch.diag(eig) @ q.T
    ws = [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in sizes]
    holder = nn.Module()
    holder.ps = nn.ParameterList(ws)

    def loss():
        w = torch.cat(list(ws))
        return 0.5 * w @ A @ w

    return holder, ws, A, eig, loss


def test_power_iteration_with_deflation_matches_eigvalsh():
    holder, ws, A, eig, loss = quadratic()
    with hessian_mode(holder):
        op = HessianOperator({"a": [ws[0]], "b": [ws[1]]}, loss)
        res = top_eigenvalues(op, top_k=3, max_iter=500, tol=1e-10, seed=0)
    by_mag = sorted(eig.tolist(), key=abs, reverse=True)[:3]  # 9, -6, 4
    assert res.values == pytest.approx(by_mag, rel=1e-5)
    assert all(res.converged)
    # block eigenvalue: top eigenvalue of A restricted to the second group
    with hessian_mode(holder):
        op = HessianOperator({"a": [ws[0]], "b": [ws[1]]}, loss)
        blk = top_eigenvalues(op, group="b", max_iter=1000, tol=1e-12).values[0]
    ev = torch.linalg.eigvalsh(A[5:, 5:])
    assert blk == pytest.approx(ev[ev.abs().argmax()].item(), rel=1e-5)


def test_hutchinson_trace_of_quadratic_within_tolerance():
    holder, ws, A, eig, loss = quadratic(seed=1)
    with hessian_mode(holder):
        op = HessianOperator({"a": [ws[0]], "b": [ws[1]]}, loss)
        res = hutchinson_traces(op, tol=0.03, max_iter=5000, seed=0)
    exact = {"a": A[:5, :5].trace().item(), "b": A[5:, 5:].trace().item()}
    assert res.converged and res.products == res.iterations
    for n, t in exact.items():
        assert res.stderr[n] <= 0.03 * abs(res.traces[n]) + 1e-12
        assert abs(res.traces[n] - t) <= 4 * res.stderr[n]
    # whole-model trace = sum of the block traces
    assert sum(res.traces.values()) == pytest.approx(eig.sum().item(), rel=0.1)


def test_shared_sample_layer_traces_converge_to_exact_and_match_per_layer_loop():
    model = small_model().double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in data(5, n=32))
    H, (n1, _) = exact_hessian(model, [batch])
    exact = {"fc1": H[:n1, :n1].trace().item(), "fc2": H[n1:, n1:].trace().item()}
    groups = layer_groups(model, ["fc1", "fc2"])
    with hessian_mode(model, "eval"):
        op = HessianOperator(groups, batch_losses(model, [batch], ce))
        shared = hutchinson_traces(op, tol=1e-9, max_iter=1000, seed=0)  # 1000 samples
        loop = per_layer_traces(op, tol=1e-9, max_iter=1000, seed=1)
    assert shared.iterations == 1000 and not shared.converged
    for n, t in exact.items():
        se = shared.stderr[n]
        assert abs(shared.traces[n] - t) <= 4 * se, (n, shared.traces[n], t, se)
        lt = loop[n]
        assert abs(lt.traces[n] - t) <= 4 * lt.stderr[n]
        assert abs(shared.traces[n] - lt.traces[n]) <= 4 * (se**2 + lt.stderr[n] ** 2) ** 0.5
    # exact single-sample variances for fc2 (block l, other block k), Rademacher v:
    # per-layer  Var(v_l^T H_ll v_l) = 2 (||H_ll||_F^2 - sum_i (H_ll)_ii^2)
    # shared     Var(v_l^T (Hv)_l)   = the above + ||H_lk||_F^2   (cross terms add variance)
    Hll, Hlk = H[n1:, n1:], H[n1:, :n1]
    var_loop = 2 * ((Hll**2).sum() - (torch.diagonal(Hll) ** 2).sum())
    var_shared = var_loop + (Hlk**2).sum()
    emp_shared = shared.samples[:, 1].var().item()
    emp_loop = loop["fc2"].samples[:, 0].var().item()
    assert emp_shared == pytest.approx(var_shared.item(), rel=0.2)
    assert emp_loop == pytest.approx(var_loop.item(), rel=0.2)


def test_bn_statistics_untouched_grads_zeroed_and_inference_mode():
    model = small_model()
    batch = data(7)
    for p in model.parameters():
        p.grad = torch.full_like(p, 123.0)  # stale gradients must neither leak nor survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.inference_mode():  # as inside Lightning's validation loop
        xb = (batch[0] + 0, batch[1] + 0)  # inference tensors
        with hessian_mode(model, "train"):
            assert model.training and not model.bn.running_mean.is_inference()
            op = HessianOperator(layer_groups(model, ["fc1", "fc2"]), batch_losses(model, [xb], ce))
            res = hutchinson_traces(op, tol=1e-9, max_iter=3, min_iter=2)
            eig = top_eigenvalues(op, max_iter=5)
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # the estimate does not depend on the stale grads: rerun without them
    with hessian_mode(model, "train"):
        op = HessianOperator(layer_groups(model, ["fc1", "fc2"]), batch_losses(model, [batch], ce))
        res2 = hutchinson_traces(op, tol=1e-9, max_iter=3, min_iter=2)
        eig2 = top_eigenvalues(op, max_iter=5)
    assert res.traces == pytest.approx(res2.traces, rel=1e-6)
    assert eig.values == pytest.approx(eig2.values, rel=1e-6)
    # train mode really used batch statistics (eval-mode value differs)
    with hessian_mode(model, "eval"):
        op = HessianOperator(layer_groups(model, ["fc1", "fc2"]), batch_losses(model, [batch], ce))
        res3 = hutchinson_traces(op, tol=1e-9, max_iter=3, min_iter=2)
    assert res3.traces["fc2"] != pytest.approx(res2.traces["fc2"], rel=1e-3)
    assert model.training


def test_frozen_parameter_and_bad_groups_raise():
    model = small_model()
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="group 'fc1' does not require grad"):
        HessianOperator(layer_groups(model, ["fc1", "fc2"]), lambda: model(data()[0]).sum())
    with pytest.raises(ValueError, match="no module named 'nope'"):
        layer_groups(model, ["nope"])
    with pytest.raises(ValueError, match="appears in groups"):
        HessianOperator({"a": [model.fc2.weight], "b": [model.fc2.weight]}, lambda: 0)
    with pytest.raises(ValueError, match="mode="), hessian_mode(model, "inference"):
        pass
