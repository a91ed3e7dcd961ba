"""Learned quantizers (qtrain.nn.learned_quantizers): values and gradients vs hand formulas,
and one training step inside a QuantLinear."""

import itertools
import math

import pytest
import torch
from torch import nn

from qtrain.nn import learned_quantizers as LQ
from qtrain.nn.fake_quant import QuantLinear
from qtrain.quant import estimators as E


# ---------------------------------------------------------------- DoReFa
def test_dorefa_weight_module_values_and_storage():
    w = torch.tensor([[-2.0, -0.5], [0.05, 1.0]])
    q = LQ.DoReFaWeightQuantizer(2)
    t = torch.tanh(w)
    ref = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * 3) / 3 - 1
    assert torch.allclose(q(w), ref)
    assert set(torch.round((q(w) + 1) / 2 * 3).tolist()[0]) <= {0.0, 1.0, 2.0, 3.0}
    assert q.storage_bits(w) == 2 * 4
    assert LQ.DoReFaWeightQuantizer(1).storage_bits(w) == 4 + 32


def test_dorefa_act_gradient_bits_order_and_seed():
    x = torch.tensor([[-0.3, 0.2, 0.7, 1.5], [0.1, 0.4, 0.9, 0.6]], requires_grad=True)
    q = LQ.DoReFaActQuantizer(2, grad_bits=2, seed=11, grad_at="input")  # the named option
    y = q(x)
    assert torch.allclose(y, E.dorefa_activation(x.detach(), 2))
    g = torch.tensor([[1.0, -0.5, 0.25, 3.0], [0.3, -0.2, 0.1, 0.05]])
    y.backward(g)
    mask = ((x >= 0) & (x <= 1)).float()
    ref = E.quantize_gradient_value(g * mask, 2, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(x.grad, ref)
    # a fresh module with the same seed reproduces the same quantized gradient
    x2 = x.detach().clone().requires_grad_(True)
    LQ.DoReFaActQuantizer(2, grad_bits=2, seed=11, grad_at="input")(x2).backward(g)
    assert torch.equal(x2.grad, x.grad)
    with pytest.raises(ValueError, match="grad_bits"):
        LQ.DoReFaActQuantizer(2, grad_bits=0)


# ---------------------------------------------------------------- PACT
def test_pact_values_and_gradients_by_hand():
    x = torch.tensor([-1.0, 0.1, 0.5, 0.99, 1.0, 1.7, 4.0], requires_grad=True)
    q = LQ.PACTQuantizer(2, alpha_init=1.0)
    y = q(x)
    # clip to [0, 1] then 3 levels steps of 1/3: 0, .3->0, 1.5->2, 2.97->3, 3, 3, 3
    assert torch.allclose(y, torch.tensor([0, 0, 2, 3, 3, 3, 3]) / 3.0)
    g = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    assert q.alpha.grad.item() == pytest.approx(4.0 + 5.0 + 6.0)  # upstream where x >= alpha
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]


def test_pact_alpha_grad_is_count_with_unit_upstream():
    x = torch.rand(64) * 3
    q = LQ.PACTQuantizer(3, alpha_init=1.2)
    q(x).sum().backward()
    assert q.alpha.grad.item() == (x >= 1.2).sum().item()


def test_pact_regularization_and_helper():
    model = nn.Sequential(nn.Linear(2, 2))
    model.a = LQ.PACTQuantizer(4, alpha_init=3.0, l2_decay=0.01)
    model.b = LQ.PACTQuantizer(4, alpha_init=2.0, l2_decay=0.1)
    reg = LQ.regularization_loss(model)
    assert reg.item() == pytest.approx(0.01 * 9 + 0.1 * 4)
    reg.backward()
    assert model.a.alpha.grad.item() == pytest.approx(2 * 0.01 * 3.0)
    assert LQ.regularization_loss(nn.Linear(2, 2)).item() == 0.0
    assert LQ.PACTQuantizer(4).alpha.item() == 10.0
    with pytest.raises(ValueError, match="alpha_init"):
        LQ.PACTQuantizer(4, alpha_init=0.0)


# ---------------------------------------------------------------- LSQ
def _lsq_ref(x, s, qn, qp, g, n_grad):
    out, gx, gs = [], [], 0.0
    for xi, gi in zip(x, g):
        v = xi / s
        out.append(round(min(max(v, -qn), qp)) * s)
        if v <= -qn:
            gx.append(0.0)
            gs += gi * -qn
        elif v >= qp:
            gx.append(0.0)
            gs += gi * qp
        else:
            gx.append(gi)
            gs += gi * (round(v) - v)
    return out, gx, gs / math.sqrt(n_grad * qp)


def test_lsq_signed_value_and_step_gradient_with_grad_scale():
    x = [-2.0, -0.7, -0.1, 0.26, 0.55, 0.9, 1.6]
    g = [0.3, -1.0, 0.5, 2.0, -0.4, 1.5, 0.8]
    q = LQ.LSQQuantizer(3, signed=True, init_step=0.25)  # Qn = 4, Qp = 3
    xt = torch.tensor(x, requires_grad=True)
    y = q(xt)
    y.backward(torch.tensor(g))
    out, gx, gs = _lsq_ref(x, 0.25, 4, 3, g, n_grad=len(x))
    assert torch.allclose(y, torch.tensor(out))
    assert torch.allclose(xt.grad, torch.tensor(gx))
    assert q.step.grad.item() == pytest.approx(gs, rel=1e-5)


def test_lsq_unsigned_activation_uses_features_per_sample():
    x = torch.rand(4, 6) * 2
    g = torch.randn(4, 6)
    q = LQ.LSQQuantizer(2, signed=False, role="activation", init_step=0.3)  # Qn=0, Qp=3
    xt = x.clone().requires_grad_(True)
    q(xt).backward(g)
    _, _, gs = _lsq_ref(x.flatten().tolist(), 0.3, 0, 3, g.flatten().tolist(), n_grad=6)
    assert q.step.grad.item() == pytest.approx(gs, rel=1e-5)


def test_lsq_step_init_on_first_forward():
    x = torch.randn(10, 10)
    q = LQ.LSQQuantizer(4)  # Qp = 7
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    before = q.step.item()
    q(x * 5)  # no re-initialisation
    assert q.step.item() == before
    with pytest.raises(ValueError, match="signed needs bits >= 2"):
        LQ.LSQQuantizer(1, signed=True)
    assert LQ.LSQQuantizer(1, signed=False).qn_qp == (0, 1)
    with pytest.raises(ValueError, match="role"):
        LQ.LSQQuantizer(4, role="bias")


# ---------------------------------------------------------------- DSQ
def _dsq_ref(x, lo, hi, alpha, bits):
    n = 2**bits - 1
    d = (hi - lo) / n
    k = math.log(2 / alpha - 1) / d
    s = 1 / math.tanh(0.5 * k * d)
    out = []
    for v in x:
        if v < lo:
            out.append(lo)
        elif v > hi:
            out.append(hi)
        else:
            i = min(int((v - lo) // d), n - 1)
            phi = s * math.tanh(k * (v - (lo + (i + 0.5) * d)))
            out.append(lo + d * (i + (phi + 1) / 2))
    return out


def test_dsq_soft_values_equal_tanh_formula():
    x = [-1.5, -1.0, -0.8, -0.2, 0.05, 0.33, 0.7, 1.2, 2.0]
    q = LQ.DSQQuantizer(2, alpha_init=0.2, lower=-1.0, upper=1.4, ste_forward=False)
    y = q(torch.tensor(x))
    assert torch.allclose(y, torch.tensor(_dsq_ref(x, -1.0, 1.4, 0.2, 2)), atol=1e-5)
    # s = 1 / tanh(k Delta / 2) = 1 / (1 - alpha)
    d = 2.4 / 3
    k = math.log(2 / 0.2 - 1) / d
    assert 1 / math.tanh(0.5 * k * d) == pytest.approx(1 / (1 - 0.2))


def test_dsq_tends_to_hard_as_alpha_to_zero_and_eval_is_hard():
    lo, hi, bits = -1.0, 2.0, 2  # Delta = 1, levels -1, 0, 1, 2
    # points within Delta/4 of a level (away from the interval midpoints)
    x = torch.tensor([-0.9, -0.2, 0.1, 0.8, 1.15, 1.9])
    hard = torch.tensor([-1.0, 0.0, 0.0, 1.0, 1.0, 2.0])
    q = LQ.DSQQuantizer(bits, lower=lo, upper=hi, ste_forward=False)
    errs = []
    for a in [0.5, 0.2, 0.05, 1e-2, 1e-4, 1e-6]:
        q.anneal(a)
        errs.append((q(x) - hard).abs().max().item())
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errs)), errs
    assert errs[-1] < 2e-3 and errs[0] > 0.1
    q.anneal(0.3)
    q.eval()
    assert torch.equal(q(x), hard)
    q.train()
    q.hard = True
    assert torch.equal(q(x), hard)
    q.hard = False
    q.hard_threshold = 0.4  # alpha 0.3 below threshold -> hard
    assert torch.equal(q(x), hard)


def test_dsq_gradients_match_finite_differences():
    q = LQ.DSQQuantizer(2, alpha_init=0.3, lower=-1.0, upper=1.0).double()
    x = torch.tensor([-0.8, -0.45, 0.1, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(q.soft, (x,))
    q.soft(x).sum().backward()
    for p in (q.alpha, q.lower, q.upper):
        assert p.grad is not None and p.grad.abs().item() > 0


def test_dsq_ste_forward_is_hard_with_soft_gradient():
    x = torch.tensor([-0.8, -0.45, 0.1, 0.4, 0.9], requires_grad=True)
    q = LQ.DSQQuantizer(2, alpha_init=0.3, lower=-1.0, upper=1.0, ste_forward=True)
    y = q(x)
    d = 2 / 3
    assert torch.allclose(y, -1 + d * torch.round((x.detach() + 1) / d))
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    q.soft(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_dsq_default_trains_the_network_it_evaluates():
    """Default (the sign forward of the published re-implementations): the training forward is
    the hard quantizer the network is evaluated with, bit for bit; the soft option is not (it
    trained a ResNet-20 whose hard-quantized accuracy was chance, see the docstring); and the
    backward still gives x, alpha, l and u DSQ's gradients (the soft function's)."""
    x = torch.linspace(-1.3, 1.3, 41)
    q = LQ.DSQQuantizer(2, alpha_init=0.3, lower=-1.0, upper=1.0)
    assert q.ste_forward
    train_out = q.train()(x)
    eval_out = q.eval()(x)
    assert torch.equal(train_out, eval_out)
    d = 2 / 3  # hand-worked levels -1, -1/3, 1/3, 1
    assert torch.allclose(train_out, -1 + d * torch.round((x.clamp(-1, 1) + 1) / d))
    soft = LQ.DSQQuantizer(2, alpha_init=0.3, lower=-1.0, upper=1.0, ste_forward=False)
    assert (soft.train()(x) - eval_out).abs().max() > 0.05
    q.train()
    xg = x.clone().requires_grad_(True)
    (q(xg) * torch.arange(41.0)).sum().backward()
    ref = LQ.DSQQuantizer(2, alpha_init=0.3, lower=-1.0, upper=1.0, ste_forward=False)
    xr = x.clone().requires_grad_(True)
    (ref.soft(xr) * torch.arange(41.0)).sum().backward()
    assert torch.allclose(xg.grad, xr.grad)
    for p, pr in ((q.alpha, ref.alpha), (q.lower, ref.lower), (q.upper, ref.upper)):
        assert p.grad is not None and torch.allclose(p.grad, pr.grad), (p.grad, pr.grad)


def test_dsq_init_range_and_bad_args():
    q = LQ.DSQQuantizer(3)
    x = torch.randn(50)
    q(x)
    assert q.lower.item() == x.min().item() and q.upper.item() == x.max().item()
    with pytest.raises(ValueError, match="alpha"):
        LQ.DSQQuantizer(2, alpha_init=0.7)
    with pytest.raises(ValueError, match="lower"):
        LQ.DSQQuantizer(2, lower=1.0, upper=0.0)


# ---------------------------------------------------------------- Polino
# Polino differentiable quantization (bucketed points in [0, 1]): tests/nn/test_polino_quantizer.py


# ---------------------------------------------------------------- soft-to-hard VQ
def test_soft_to_hard_vq_forward_hard_backward_soft():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    q = LQ.SoftToHardVQ(bits=2, dim=2, sigma=0.7, seed=3)
    y = q(x)
    z = x.detach().reshape(-1, 2)
    c = q.centers.detach()
    # centers initialised to 4 distinct sub-vectors of x
    assert all(any(torch.equal(ci, zi) for zi in z) for ci in c)
    ref_hard = torch.stack([c[min(range(4), key=lambda j: float(((zi - c[j]) ** 2).sum()))]
                            for zi in z])
    assert torch.allclose(y.reshape(-1, 2), ref_hard)
    g = torch.randn(4, 8)
    y.backward(g)
    # reference gradient: the soft assignment written out with exp, differentiated by autograd
    xr = x.detach().clone().requires_grad_(True)
    cr = c.clone().requires_grad_(True)
    zr = xr.reshape(-1, 2)
    d2 = ((zr[:, None, :] - cr[None, :, :]) ** 2).sum(-1)
    w = torch.exp(-0.7 * d2)
    soft = (w / w.sum(1, keepdim=True)) @ cr
    soft.reshape(4, 8).backward(g)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(q.centers.grad, cr.grad, atol=1e-5)


def test_soft_to_hard_vq_large_sigma_center_grad_sums_assigned():
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    q = LQ.SoftToHardVQ(bits=2, dim=3, seed=0)
    q(x)
    q.anneal(1e4)
    g = torch.randn(3, 12)
    q(x).backward(g)
    idx = q.sq_distances(x.reshape(-1, 3)).argmin(1)
    ref = torch.zeros(4, 3).index_add_(0, idx, g.reshape(-1, 3))
    assert torch.allclose(q.centers.grad, ref, atol=1e-4)
    assert q.storage_bits(x) == 2 * 12 + 4 * 3 * 32


def test_soft_to_hard_vq_bad_input():
    with pytest.raises(ValueError, match="dim=3 does not divide"):
        LQ.SoftToHardVQ(bits=1, dim=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="sub-vectors"):
        LQ.SoftToHardVQ(bits=4, dim=2)(torch.randn(2, 4))


# ---------------------------------------------------------------- inside QuantLinear
CASES = {
    "dorefa_w": (lambda: LQ.DoReFaWeightQuantizer(3), None),
    "dorefa_w1": (lambda: LQ.DoReFaWeightQuantizer(1), None),
    "dorefa_a": (None, lambda: LQ.DoReFaActQuantizer(4, grad_bits=8, seed=0)),
    "pact": (None, lambda: LQ.PACTQuantizer(4, alpha_init=0.8, l2_decay=1e-3)),
    "lsq": (lambda: LQ.LSQQuantizer(4), lambda: LQ.LSQQuantizer(4, signed=False,
                                                                  role="activation")),
    "dsq": (lambda: LQ.DSQQuantizer(3, alpha_init=0.3), None),
    "polino": (lambda: LQ.PolinoDifferentiableQuantizer(3), None),
    "vq": (lambda: LQ.SoftToHardVQ(bits=3, dim=2, sigma=50.0), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_quantizer_in_quantlinear_one_sgd_step(name):
    wq, aq = CASES[name]
    torch.manual_seed(0)
    x = torch.rand(64, 8)  # non-negative, like post-ReLU inputs
    target = x @ torch.randn(8, 4) * 0.5
    layer = QuantLinear.from_float(nn.Linear(8, 4), wq and wq(), aq and aq())
    loss_fn = nn.MSELoss()

    def loss():
        return loss_fn(layer(x), target) + LQ.regularization_loss(layer)

    l0 = loss()  # first forward initialises lazy quantizer parameters
    w_before = layer.weight.detach().clone()
    q_before = {n: p.detach().clone() for n, p in layer.named_parameters()
                if n not in ("weight", "bias")}
    layer.zero_grad()
    l0 = loss()
    l0.backward()
    assert torch.equal(layer.weight.detach(), w_before), "forward modified the float weight"
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    opt.step()
    if hasattr(layer.weight_quantizer, "resort"):
        layer.weight_quantizer.resort()
    with torch.no_grad():
        l1 = loss()
    assert l1.item() < l0.item()
    changed = [n for n, p in layer.named_parameters()
               if n in q_before and not torch.equal(p.detach(), q_before[n])]
    assert changed or not q_before, "no learned quantizer parameter was updated"


def test_storage_bits_and_state_dict_roundtrip():
    w = torch.randn(8, 6)
    assert LQ.PACTQuantizer(3).storage_bits(w) == 3 * 48 + 32
    assert LQ.LSQQuantizer(4).storage_bits(w) == 4 * 48 + 32
    assert LQ.DSQQuantizer(2).storage_bits(w) == 2 * 48 + 64
    assert LQ.DoReFaActQuantizer(2).storage_bits(w) == 2 * 48
    for make in (lambda: LQ.LSQQuantizer(3), lambda: LQ.DSQQuantizer(2),
                 lambda: LQ.PolinoDifferentiableQuantizer(2),
                 lambda: LQ.SoftToHardVQ(bits=2, dim=2, sigma=3.0)):
        a, b = make(), make()
        ya = a(w)
        b.load_state_dict(a.state_dict())  # lazily initialised values are restored
        assert torch.equal(b(w * 3), a(w * 3)) and torch.equal(b(w), ya)


def test_pact_alpha_calibrate_option_sets_the_percentile_once():
    """alpha_init="calibrate": alpha = the 99.9th percentile (numpy) of the first quantized
    batch, then learned as usual (a second batch does not reset it); no L2 term before; a
    loaded alpha is kept."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    q = LQ.PACTQuantizer(4, alpha_init="calibrate", l2_decay=1e-4)
    assert torch.isnan(q.alpha) and float(q.regularization()) == 0.0
    x = torch.relu(torch.randn(64, 8, 5, 5, generator=g)) * 2
    y = q(x)
    want = np.percentile(x.numpy().reshape(-1), 99.9)
    assert float(q.alpha) == pytest.approx(want, rel=1e-5)
    assert float(y.max()) == pytest.approx(want, rel=1e-5)  # the top level is alpha
    assert len(torch.unique(y)) == 16  # every 4-bit level used: not the 0.67 step of alpha=10
    q(x * 10)
    assert float(q.alpha) == pytest.approx(want, rel=1e-5)
    assert float(q.regularization()) == pytest.approx(1e-4 * want**2, rel=1e-5)
    r = LQ.PACTQuantizer(4, alpha_init="calibrate")
    r.load_state_dict({"alpha": torch.tensor(3.0)})
    r(x)
    assert float(r.alpha) == 3.0
    with pytest.raises(ValueError, match="calibrate"):
        LQ.PACTQuantizer(4, alpha_init="max")
