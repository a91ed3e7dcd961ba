"""FP8 training (Wang et al. 2018, sec. 3 / Fig. 1): all three GEMMs of a layer take FP8
operands -- W_8 and X_8 in the forward, the E5M2 error dY_8 in both backward GEMMs -- checked
against the three GEMMs computed by hand from quantized operands (torch's float8 casts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.fp8_training import FP8TrainingQuantizer, chunked_gemm


def e5m2(x):
    return x.to(torch.float8_e5m2).float()


def _upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])


def test_linear_three_gemms_fp8_operands_fp32_accumulation():
    torch.manual_seed(0)
    lin = QuantLinear.from_float(torch.nn.Linear(24, 7), FP8TrainingQuantizer(),
                                 FP8TrainingQuantizer())
    x = torch.randn(5, 24, requires_grad=True)
    gy = _upstream((5, 7), 1)
    y = lin(x)
    xq, wq, dy = e5m2(x.detach()), e5m2(lin.weight.detach()), e5m2(gy)
    torch.testing.assert_close(y, xq @ wq.t() + lin.bias.detach())
    y.backward(gy)
    torch.testing.assert_close(x.grad, dy @ wq)  # error GEMM: dY_8 W_8
    torch.testing.assert_close(lin.weight.grad, dy.t() @ xq)  # weight GEMM: dY_8^T X_8
    torch.testing.assert_close(lin.bias.grad, dy.sum(0))
    # the old place (GEMM outputs rounded, error float) is far from it
    assert not torch.allclose(lin.weight.grad, e5m2(gy.t() @ xq), rtol=1e-3)


def test_linear_three_gemms_chunked_fp16_accumulation():
    torch.manual_seed(1)
    opts = dict(accumulation="chunked", chunk_size=8)
    lin = QuantLinear.from_float(torch.nn.Linear(40, 6, bias=False),
                                 FP8TrainingQuantizer(**opts), FP8TrainingQuantizer())
    x = torch.randn(20, 40, requires_grad=True)
    gy = _upstream((20, 6), 2)
    y = lin(x)
    xq, wq, dy = e5m2(x.detach()), e5m2(lin.weight.detach()), e5m2(gy)
    assert torch.equal(y, chunked_gemm(xq, wq.t(), 8))
    y.backward(gy)
    assert torch.equal(x.grad, chunked_gemm(dy, wq, 8))  # reduction over the 6 outputs
    assert torch.equal(lin.weight.grad, chunked_gemm(dy.t(), xq, 8))  # over the 20 rows


def test_conv_three_gemms_against_torch_conv_grads():
    torch.manual_seed(2)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                  FP8TrainingQuantizer(), FP8TrainingQuantizer())
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    y = conv(x)
    gy = _upstream(y.shape, 3)
    y.backward(gy)
    xq, wq, dy = e5m2(x.detach()), e5m2(conv.weight.detach()), e5m2(gy)
    torch.testing.assert_close(y.detach(), F.conv2d(xq, wq, conv.bias.detach(), 2, 1))
    torch.testing.assert_close(x.grad, conv2d_input(x.shape, wq, dy, stride=2, padding=1))
    torch.testing.assert_close(conv.weight.grad,
                               conv2d_weight(xq, conv.weight.shape, dy, stride=2, padding=1))


def test_weight_slot_only_rounds_the_error_and_disabled_leaves_it_float():
    # a layer with only a weight-slot FP8TrainingQuantizer still rounds its error (here with
    # seeded stochastic rounding); disabled quantizers (the FP32 phase) leave it float
    from qtrain.quant.floats import simulate_float

    torch.manual_seed(3)
    lin = QuantLinear.from_float(torch.nn.Linear(6, 3, bias=False),
                                 FP8TrainingQuantizer(grad_rounding="stochastic", seed=5), None)
    x = torch.randn(4, 6)
    gy = _upstream((4, 3), 4)
    lin(x).backward(gy)
    g = torch.Generator().manual_seed(5 + 1)  # the quantizer's "grad" generator
    dy = simulate_float(gy, "e5m2", None, "stochastic", g)
    torch.testing.assert_close(lin.weight.grad, dy.t() @ x)  # no act quantizer: X float
    assert not torch.equal(dy, e5m2(gy))  # stochastic, not nearest
    lin.weight.grad = None
    lin.weight_quantizer.enabled = False
    lin(x).backward(gy)
    torch.testing.assert_close(lin.weight.grad, gy.t() @ x)
    with pytest.raises(ConfigError, match="grad_at='input'"):
        FP8TrainingQuantizer(grad_at="input")


def test_recipe_uses_error_rounding(tmp_path):
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["recipe=fp8_training_resnet20_cifar10"], tmp_path)
    cb = instantiate(cfg.quant)
    wq, aq = cb.weight_factory(bits=8), cb.act_factory(bits=8)
    assert wq.grad_at == aq.grad_at == "error"
