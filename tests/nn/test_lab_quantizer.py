"""LAB weight quantizer (Hou et al. 2017): alpha = ||d w||_1 / ||d||_1 against hand-worked
numbers and a brute-force minimisation of the d-weighted error, straight-through gradient,
storage, state-dict round trip."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.lab_quantizer import LABWeightQuantizer, lab_alpha


def test_alpha_hand_computed():
    w = torch.tensor([[0.5, -0.2], [0.1, -0.8]])
    d = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # ||d w||_1 = 0.5 + 0.4 + 0.3 + 3.2 = 4.4, ||d||_1 = 10
    q = LABWeightQuantizer(1)
    q.set_curvature(d)
    assert q.alpha(w).item() == pytest.approx(0.44, abs=1e-7)
    expected = 0.44 * torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    torch.testing.assert_close(q(w), expected)


def test_constant_d_gives_mean_abs_and_default_before_first_step():
    w = torch.tensor([0.5, -0.2, 0.0, -0.8, 0.3])
    mean_abs = w.abs().mean().item()  # 0.36
    q = LABWeightQuantizer(1)  # no curvature yet: d = 1
    assert q.d.dim() == 0
    assert q.alpha(w).item() == pytest.approx(mean_abs, abs=1e-7)
    # sign(0) = +1
    torch.testing.assert_close(q(w), mean_abs * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]))
    q.set_curvature(torch.full_like(w, 3.7))  # any constant d
    assert q.alpha(w).item() == pytest.approx(mean_abs, abs=1e-6)


def test_alpha_minimises_d_weighted_error_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    d = torch.exp(1.5 * torch.randn(64, generator=g, dtype=torch.float64))
    grid = torch.linspace(0, w.abs().max().item(), 200001, dtype=torch.float64)
    sign = torch.where(w >= 0, 1.0, -1.0).double()
    err = (d[None] * (w[None] - grid[:, None] * sign[None]) ** 2).sum(1)
    best = grid[err.argmin()].item()
    step = (grid[1] - grid[0]).item()
    a = lab_alpha(w, d).item()
    assert abs(a - best) <= step
    # the test discriminates: the unweighted scale is far from the optimum
    assert abs(w.abs().mean().item() - best) > 100 * step


def test_straight_through_gradient_reaches_float_weight():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight.mul_(4)  # some |w| > 1: the identity STE passes their gradient too
    layer = QuantLinear.from_float(lin, LABWeightQuantizer(1))
    d = torch.rand(3, 5) + 0.1
    layer.weight_quantizer.set_curvature(d)
    x, r = torch.randn(4, 5), torch.randn(4, 3)
    w_before = layer.weight.detach().clone()
    (layer(x) * r).sum().backward()
    assert torch.equal(layer.weight.detach(), w_before)  # the forward leaves w intact
    # reference: autograd w.r.t. the binarized weight itself, w_hat = alpha sign(w)
    alpha = (d * w_before.abs()).sum() / d.sum()
    w_hat = (alpha * torch.where(w_before >= 0, 1.0, -1.0)).requires_grad_()
    y = F.linear(x, w_hat, layer.bias.detach())
    (y * r).sum().backward()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.weight.grad, w_hat.grad)
    assert (w_before.abs() > 1).any()


def test_storage_codes_and_bits():
    q = LABWeightQuantizer(1)
    w = torch.randn(8, 4, 3, 3)
    assert q.storage_bits(w) == w.numel() + 32  # 1 bit per weight + one fp32 alpha
    assert torch.equal(q.codes(w), (w >= 0).int())
    with pytest.raises(ValueError, match="allowed: 1..1"):
        LABWeightQuantizer(2)


def test_state_dict_round_trip_and_shape_check():
    w = torch.randn(4, 6)
    q = LABWeightQuantizer(1)
    q.set_curvature(torch.rand(4, 6) + 0.5)
    fresh = LABWeightQuantizer(1)  # scalar d, as after conversion in a new process
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(w), q(w))
    assert not torch.allclose(fresh(w), LABWeightQuantizer(1)(w))
    with pytest.raises(ValueError, match="curvature d has shape"):
        q(torch.randn(6, 4))
