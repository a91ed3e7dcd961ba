"""Format quantizer modules inside QuantLinear / QuantConv2d: values, grads, storage, errors."""

import pytest
import torch
from torch import nn

from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import (
    BinaryActQuantizer,
    BinaryWeightQuantizer,
    DynamicFixedPointQuantizer,
    FloatQuantizer,
    PowerOfTwoQuantizer,
    S2FP8Quantizer,
    ShiftScaleQuantizer,
    StochasticUniformQuantizer,
    TTQQuantizer,
    TWNQuantizer,
)
from qtrain.nn.uniform_quantizer import UniformQuantizer

W_SHAPE = (8, 4, 3, 3)  # 288 weights, 8 output channels

CASES = [
    (lambda: BinaryWeightQuantizer(1), 288 + 8 * 32),
    (lambda: TWNQuantizer(2), 2 * 288 + 32),
    (lambda: TWNQuantizer(2, per_channel=True), 2 * 288 + 8 * 32),
    (lambda: TTQQuantizer(2), 2 * 288 + 64),
    (lambda: PowerOfTwoQuantizer(4), 4 * 288 + 8),
    (lambda: ShiftScaleQuantizer(4, granularity="channel"), 4 * 288 + 8 * 8),
    (lambda: ShiftScaleQuantizer(4, symmetric=False), 4 * 288 + 8 + 4),
    (lambda: StochasticUniformQuantizer(4, granularity="channel", seed=0), 4 * 288 + 8 * 32),
    (lambda: DynamicFixedPointQuantizer(8), 8 * 288 + 8),
    (lambda: FloatQuantizer(8), 8 * 288),
    (lambda: FloatQuantizer(16, "bf16"), 16 * 288),
    (lambda: S2FP8Quantizer(8), 8 * 288 + 64),
]


@pytest.mark.parametrize("make,bits", CASES)
def test_quantizer_in_conv_storage_grad_and_master_weight_intact(make, bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    q = make()
    layer = QuantConv2d.from_float(conv, weight_quantizer=q)
    w0 = conv.weight.detach().clone()
    out = layer(torch.randn(2, 4, 5, 5))
    out.square().mean().backward()
    assert torch.equal(conv.weight.detach(), w0)  # forward never writes the master weight
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert q.storage_bits(conv.weight) == bits
    wq = q(conv.weight).detach()
    assert not torch.equal(wq, w0)  # it quantizes something
    if not list(q.parameters()):  # (TTQ's learned scales: see the note in the report)
        assert layer.storage_bits() == bits + 8 * 32  # + fp32 bias


def test_binary_activation_in_linear():
    lin = QuantLinear.from_float(nn.Linear(5, 3), BinaryWeightQuantizer(1), BinaryActQuantizer(1))
    x = torch.tensor([[0.5, -2.0, 0.0, 1.5, -0.1]], requires_grad=True)
    lin(x).sum().backward()
    xb = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]])
    w = lin.weight.detach()
    wb = w.abs().mean(1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    ref = xb @ wb.T + lin.bias.detach()
    torch.testing.assert_close(lin(x), ref)
    g_ref = wb.sum(0) * torch.tensor([1.0, 0, 1, 0, 1])
    torch.testing.assert_close(x.grad[0], g_ref)


def test_ttq_scales_are_learned_parameters():
    q = TTQQuantizer(2)
    lin = QuantLinear.from_float(nn.Linear(16, 4), weight_quantizer=q)
    names = {n for n, _ in lin.named_parameters()}
    assert {"weight_quantizer.w_p", "weight_quantizer.w_n"} <= names
    lin(torch.randn(3, 16)).sum().backward()
    assert q.w_p.grad is not None and q.w_n.grad is not None
    w = lin.weight.detach()
    pos = w > 0.05 * w.abs().max()
    assert q.w_p.item() == pytest.approx(w[pos].mean().item(), rel=1e-5)


def test_ttq_init_scale_constant_and_bad_value():
    q = TTQQuantizer(2, init_scale=1.0)
    w = torch.randn(4, 16) * 0.05
    out = q(w)
    assert q.w_p.item() == q.w_n.item() == 1.0
    pos, neg = w > 0.05 * w.abs().max(), w < -0.05 * w.abs().max()
    assert torch.equal(out, pos.float() - neg.float())
    with pytest.raises(ValueError, match="init_scale=0.0 must be > 0"):
        TTQQuantizer(2, init_scale=0.0)


def test_stochastic_uniform_nearest_equals_uniform_and_seed_reproducible():
    w = torch.randn(16, 32)
    a = StochasticUniformQuantizer(4, granularity="channel", rounding="nearest")(w)
    b = UniformQuantizer(4, granularity="channel")(w)
    assert torch.equal(a, b)
    s1 = StochasticUniformQuantizer(4, seed=7)
    s2 = StochasticUniformQuantizer(4, seed=7)
    assert torch.equal(s1(w), s2(w)) and torch.equal(s1(w), s2(w))
    # unbiased: the average of many stochastic fake-quants approaches w
    s3 = StochasticUniformQuantizer(4, seed=1)
    mean = torch.stack([s3(w) for _ in range(400)]).mean(0)
    step = w.abs().max() / 7.5
    inside = (w / step).abs() < 7  # the symmetric grid clamps +7.5 to 7 (biased at the top)
    assert (mean - w)[inside].abs().max() < 0.15 * step


def test_shift_scale_is_power_of_two():
    q = ShiftScaleQuantizer(4, granularity="channel")
    w = torch.randn(6, 10)
    s = q.qparams(w).scale
    assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))
    assert (s >= w.abs().amax(1, keepdim=True) / 7.5).all()  # ceil never narrows the range


@pytest.mark.parametrize("make,match", [
    (lambda: BinaryWeightQuantizer(2), "bits=2"),
    (lambda: TWNQuantizer(3), "bits=3"),
    (lambda: PowerOfTwoQuantizer(1), "bits=1"),
    (lambda: FloatQuantizer(4), "bits=4"),
    (lambda: FloatQuantizer(8, "fp16"), "fmt='fp16'"),
    (lambda: DynamicFixedPointQuantizer(1), "bits=1"),
    (lambda: StochasticUniformQuantizer(4, rounding="up"), "rounding='up'"),
    (lambda: ShiftScaleQuantizer(4, scale_mode="floor"), "mode='floor'"),
])
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float_quantizer_set_bits_switches_format():
    q = FloatQuantizer(8, "e5m2")
    q.set_bits(16)
    assert q.fmt == "fp16"
    x = torch.randn(100)
    assert torch.equal(q(x), x.half().float())
