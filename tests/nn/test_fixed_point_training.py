"""Gupta 2015 fixed-point training quantizer: fixed-point layer input in the forward, fixed-point
error in the backward (checked against hand-worked numbers and a numpy reference)."""

import numpy as np
import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.fixed_point_training import FixedPointTrainingQuantizer, fixed_error


def _ref_fixed(x: np.ndarray, il: int, fl: int) -> np.ndarray:
    eps = 2.0 ** -fl
    return np.clip(np.round(x / eps) * eps, -(2.0 ** (il - 1)), 2.0 ** (il - 1) - eps)


def test_forward_is_the_fixed_point_input_nearest():
    q = FixedPointTrainingQuantizer(16, frac_bits=12, rounding="nearest", grad_bits=None,
                                    grad_frac_bits=None)
    x = torch.tensor([0.3, -1.23456, 9.0, -9.0, 2.0**-13 * 3])
    want = _ref_fixed(x.numpy().astype(np.float64), 4, 12)
    assert np.allclose(q(x).numpy(), want, atol=0)
    # hand-worked: 9 saturates to 8 - 2^-12, -9 to -8; 3 * 2^-13 = 1.5 eps -> 2 eps (ties to even)
    assert q(x)[2].item() == 8 - 2.0**-12 and q(x)[3].item() == -8.0
    assert q(x)[4].item() == 2 * 2.0**-12


def test_error_is_rounded_to_the_grad_format_nearest():
    lin = torch.nn.Linear(3, 2)
    aq = FixedPointTrainingQuantizer(16, frac_bits=12, rounding="nearest", grad_bits=8,
                                     grad_frac_bits=6, grad_rounding="nearest")
    layer = QuantLinear.from_float(lin, None, aq)
    x = torch.randn(4, 3, requires_grad=True)
    y = layer(x)
    gy = torch.tensor([[0.01, -0.3], [1.7, 0.004], [-5.0, 0.02], [0.5, 3.0]])
    y.backward(gy)
    gq = torch.from_numpy(_ref_fixed(gy.numpy().astype(np.float64), 2, 6)).float()
    # the rounded error feeds both backward GEMMs: dX = gq W, dW = gq^T x_q
    assert torch.allclose(x.grad, gq @ lin.weight.detach(), atol=1e-6)
    xq = torch.from_numpy(_ref_fixed(x.detach().numpy().astype(np.float64), 4, 12)).float()
    assert torch.allclose(lin.weight.grad, gq.t() @ xq, atol=1e-5)
    assert torch.allclose(lin.bias.grad, gq.sum(0), atol=1e-6)
    # hand-worked entries: 0.004 < eps/2 = 2^-7 -> 0; -5 saturates to -2; 3 to 2 - 2^-6
    assert gq[1, 1] == 0 and gq[2, 0] == -2 and gq[3, 1] == 2 - 2.0**-6


def test_stochastic_error_is_unbiased_and_on_the_grid():
    g = torch.full((200_000,), 0.3 * 2.0**-14)  # 0.3 eps: round-to-nearest loses all of it
    gen = torch.Generator().manual_seed(0)
    out = fixed_error(g, 2, 14, "stochastic", gen)
    assert torch.all(fixed_error(g, 2, 14, "nearest") == 0)
    assert set(torch.unique(out / 2.0**-14).tolist()) == {0.0, 1.0}
    assert abs(out.mean().item() / g[0].item() - 1.0) < 0.01  # E[round(x)] = x


def test_disabled_or_no_grad_format_leaves_the_error_float():
    lin = torch.nn.Linear(3, 2)
    for aq in (FixedPointTrainingQuantizer(16, grad_bits=None, grad_frac_bits=None),
               FixedPointTrainingQuantizer(16, grad_bits=16, grad_frac_bits=14)):
        if aq.grad_bits is not None:
            aq.enabled = False
        layer = QuantLinear.from_float(lin, None, aq)
        x = torch.randn(2, 3, requires_grad=True)
        gy = torch.tensor([[1e-7, 0.3], [0.2, -1e-6]])
        layer(x).backward(gy)
        assert torch.allclose(x.grad, gy @ lin.weight.detach())
        lin.zero_grad()


@pytest.mark.parametrize("kw", [dict(grad_bits=16, grad_frac_bits=None),
                                dict(grad_bits=16, grad_frac_bits=16),
                                dict(grad_rounding="up"), dict(frac_bits=16)])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        FixedPointTrainingQuantizer(16, **kw)
