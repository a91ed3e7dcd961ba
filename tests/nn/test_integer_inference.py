"""Integer-only inference (Jacob et al. 2018 sec. 2) against the fake-quant model it comes
from: every quantized tensor within one quantization step layer by layer, the output within
one accumulator step, and the same test accuracy on real sklearn digits."""

import functools

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.models.resnet_cifar import resnet20
from qtrain.models.small import SmallCNN
from qtrain.nn.bn_fold import FoldedConvBN
from qtrain.nn.integer_inference import fake_quant_codes, to_integer_model
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import requantize as R

W_PAPER = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="minmax")
W_INT8 = functools.partial(UniformQuantizer, symmetric=True, granularity="channel", observer="minmax")
ACT = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="ema")


def _convert(model, weight=W_PAPER, residual=False, freeze=None):
    cb = QATCallback(bits=8, weight=weight, act=ACT, first_last="quantize", fold_bn=True,
                     quantize_residual=residual, bn_freeze_step=freeze)
    cb.convert(model)
    return cb


def _warm(model, shape, steps=4, seed=0):
    """A few training-mode forwards: BN statistics and EMA ranges move off their init."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        model(torch.randn(shape, generator=g) * 2 + 0.3)
    return model.eval()


def _per_layer(model, x):
    """Feed every integer op the fake-quant model's own input codes; return the max code
    difference per quantized tensor and the output difference in accumulator steps."""
    im = to_integer_model(model)
    y_ref, caps = fake_quant_codes(model, x)
    y = im(x, forced=caps, record=True)
    diffs = {k: int((im.codes[k] - v).abs().max()) for k, v in caps.items()}
    last = [op.fn for op in im.ops if op.output == "output"][0]
    steps = ((y - y_ref).abs() / last.acc_scale.float()).max().item()
    return im, diffs, steps, y, y_ref


@pytest.mark.parametrize("weight", [W_PAPER, W_INT8], ids=["uint8_paper", "int8_channel"])
def test_small_cnn_per_layer_within_one_step(weight):
    torch.manual_seed(0)
    model = SmallCNN(tiny=True)
    _convert(model, weight)
    _warm(model, (16, 1, 8, 8))
    x = torch.randn(32, 1, 8, 8) * 2 + 0.3
    im, diffs, steps, _, _ = _per_layer(model, x)
    assert set(diffs) == {"features.0.act_quantizer", "features.3.act_quantizer",
                          "classifier.1.act_quantizer", "classifier.3.act_quantizer"}
    assert max(diffs.values()) <= 1, diffs
    assert steps <= 1.0  # only the int32 bias rounding (<= 0.5) and fp32 noise
    codes = im.steps[0].w_codes
    assert codes.dtype == (torch.uint8 if weight is W_PAPER else torch.int8)


def test_resnet20_per_layer_within_one_step_and_residual_add():
    torch.manual_seed(1)
    model = resnet20(tiny=True)
    cb = _convert(model, residual=True)
    assert len(cb.blocks) == 9 and cb.blocks["layer3.2"].output_quantizer is not None
    _warm(model, (8, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16) * 2 + 0.3
    im, diffs, steps, _, _ = _per_layer(model, x)
    # stem input, 9 x (block input, conv2 input, branch), last block output
    assert len(diffs) == 1 + 9 * 3 + 1
    assert max(diffs.values()) <= 1, {k: v for k, v in diffs.items() if v > 1}
    assert steps <= 1.0
    assert [op.kind for op in im.ops].count("add") == 9


def test_integer_add_matches_real_arithmetic():
    """The TFLite-style add (sec. 2.4) on hand-made codes vs the real sum re-quantized."""
    from qtrain.nn.integer_inference import ActQParams, IntegerAdd

    # scales with no small common ratio, so exact rounding ties are rare
    a, b = ActQParams(0.0213, 3, 0, 255), ActQParams(0.0517, 0, 0, 255)
    o = ActQParams(0.0611, 10, 0, 255)
    add = IntegerAdd(a, b, o, relu=True)
    qa = torch.arange(0, 256, dtype=torch.int64)
    qb = torch.flip(qa, (0,))
    real = a.dequantize(qa) + b.dequantize(qb)
    ref = torch.clamp(torch.round(torch.relu(real) / o.scale) + o.zero_point, 0, 255)
    got = add(qa, qb)
    assert (got - ref).abs().max() <= 1
    assert (got == ref).float().mean() > 0.99
    # without the rescaling (codes added as if they shared one scale) it is far off
    assert (torch.clamp(qa + qb - a.zero_point - b.zero_point + o.zero_point, 0, 255) - ref).abs().max() > 50


def test_integer_layer_uses_folded_weight_and_real_requantization():
    """Fails if folding or requantization were a no-op: the integer weight dequantizes to
    the folded weight (not the raw conv weight), and the multipliers are the real
    S_in S_w / S_out; an integer layer with M forced to 1 leaves the per-layer tolerance."""
    torch.manual_seed(2)
    model = SmallCNN(tiny=True)
    _convert(model)
    _warm(model, (16, 1, 8, 8))
    conv = model.features[0]
    assert isinstance(conv, FoldedConvBN)
    im = to_integer_model(model)
    lay = im.steps[0]
    w_deq = lay.acc_scale[0] / im.input_q.scale * (lay.w_codes.double() - lay.w_zero[0])
    step = float(lay.acc_scale[0] / im.input_q.scale)
    assert (w_deq - conv.folded_weight().double()).abs().max() <= step / 2 + 1e-6
    assert (w_deq - conv.weight.double()).abs().max() > 10 * step
    _, m0, n = lay.constants(1)
    out_scale = lay.out_q.scale
    m = (m0.double() / 2**31 * 2.0 ** (-n.double()))
    assert torch.allclose(m, lay.acc_scale / out_scale, rtol=1e-8)
    assert bool((m < 0.5).all())  # a real down-scaling, far from the no-op M = 1
    x = torch.randn(32, 1, 8, 8) * 2 + 0.3
    _, caps = fake_quant_codes(model, x)
    m1, n1 = R.quantize_multiplier(1.0)
    lay._consts[1] = (lay._consts[1][0], torch.full_like(m0, m1), torch.full_like(n, n1))
    im(x, forced=caps, record=True)
    k = "features.3.act_quantizer"
    assert int((im.codes[k] - caps[k]).abs().max()) > 1


def test_unsupported_model_is_one_clear_error():
    model = SmallCNN(tiny=True)
    QATCallback(bits=8, weight=W_PAPER, act=ACT, first_last="keep", fold_bn=True).convert(model)
    _warm(model, (4, 1, 8, 8))
    with pytest.raises(ConfigError, match="layer features.0 is not quantized"):
        to_integer_model(model)


def _digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1437]], y[perm[:1437]], x[perm[1437:]], y[perm[1437:]]


def test_digits_integer_accuracy_equals_fake_quant():
    """A small CNN with BN, QAT with folding (BN frozen after 40 steps) for 3 epochs on the
    real sklearn digits: the integer-only model's test accuracy equals the fake-quant model's
    within 0.1 pp (360 test images: the same number right)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = SmallCNN(channels=8, hidden=32)
    cb = _convert(model, freeze=40)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    step = 0
    for _ in range(3):
        model.train()
        for i in range(0, len(ytr), 64):
            cb.set_bn_frozen(step)
            loss = nn.functional.cross_entropy(model(xtr[i:i + 64]), ytr[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    assert all(bool(m.bn_frozen) for m in model.modules() if isinstance(m, FoldedConvBN))
    model.eval()
    im = to_integer_model(model)
    with torch.no_grad():
        acc_fake = (model(xte).argmax(1) == yte).float().mean().item()
        acc_int = (im(xte).argmax(1) == yte).float().mean().item()
    assert acc_fake > 0.85  # it learned
    assert abs(acc_int - acc_fake) <= 0.001, (acc_int, acc_fake)


def test_sequential_relu6_and_linear_bn_per_layer():
    """nn.Sequential with ReLU6 (clamp to [Z, Z + round(6 / S)]) and a Linear -> BatchNorm1d
    pair (FoldedLinearBN) in the integer path."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 5))
    _convert(model)
    assert type(model[4]).__name__ == "FoldedLinearBN"
    _warm(model, (16, 1, 8, 8))
    x = torch.randn(32, 1, 8, 8) * 4  # large inputs: ReLU6 saturates
    im, diffs, steps, _, _ = _per_layer(model, x)
    assert max(diffs.values()) <= 1 and steps <= 1.0
    q6 = im.ops[0].fn.clamp
    p = im.ops[0].fn.out_q
    assert q6 == (p.zero_point, min(255, p.zero_point + round(6 / p.scale)))
    assert int(im.codes["4.act_quantizer"].max()) <= q6[1]


def test_float64_blas_dot_products_equal_the_int64_reference_exactly():
    """The fast path (float64 conv / matmul, exact below 2^53) gives the int64 im2col
    accumulators bit for bit -- on every layer of a converted ResNet-20, and at the extremes
    of the code range (all codes at 0 or 255 against weights at their extremes)."""
    torch.manual_seed(2)
    model = resnet20(tiny=True)
    _convert(model, residual=True)
    _warm(model, (8, 3, 16, 16))
    im = to_integer_model(model)
    x = torch.randn(8, 3, 16, 16) * 2 + 0.3
    im(x, record=True)
    ops = [op for op in im.ops if hasattr(op.fn, "accumulate")]
    assert len(ops) == 20
    for op in ops:
        layer, q_in = op.fn, im.codes[op.inputs[0]]
        for q in (q_in, torch.full_like(q_in, 255), torch.zeros_like(q_in)):
            fast, _ = layer.accumulate(q)
            layer.fast_dot = False
            ref, _ = layer.accumulate(q)
            layer.fast_dot = True
            assert fast.dtype == ref.dtype == torch.int64
            assert torch.equal(fast, ref), layer.name
