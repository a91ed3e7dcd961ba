"""BN folding for QAT (Jacob et al. 2018 sec. 3.2, Fig. C.8) against conv -> BatchNorm in
PyTorch (eval and training semantics) and a hand-folded weight."""

import copy

import pytest
import torch
from torch import nn

from qtrain.models.resnet_cifar import resnet20
from qtrain.models.small import SmallCNN
from qtrain.nn.bn_fold import FoldedConvBN, FoldedLinearBN, find_conv_bn_pairs, fold_bn_layer
from qtrain.nn.uniform_quantizer import UniformQuantizer


def _conv_bn(bias=False, seed=0, momentum=0.1):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return conv, bn


def _fold(conv, bn, wq=None):
    return FoldedConvBN.from_conv_bn(copy.deepcopy(conv), copy.deepcopy(bn), wq)


@pytest.mark.parametrize("bias", [False, True])
def test_eval_equals_conv_then_bn(bias):
    conv, bn = _conv_bn(bias)
    x = torch.randn(4, 3, 9, 9)
    ref = bn.eval()(conv(x))
    f = _fold(conv, bn).eval()
    assert torch.allclose(f(x), ref, atol=1e-5, rtol=0)
    # folding is not a no-op: the plain conv differs from conv -> BN by far more
    assert (conv(x) - ref).abs().max() > 0.1


@pytest.mark.parametrize("bias", [False, True])
def test_training_before_freeze_is_batch_norm(bias):
    """Quantizer off, before bn_freeze: output, gradients and the moving-average update
    equal conv -> BatchNorm2d in training mode."""
    conv, bn = _conv_bn(bias, seed=1)
    conv_r, bn_r = copy.deepcopy(conv), copy.deepcopy(bn)
    f = _fold(conv, bn).train()
    x = torch.randn(8, 3, 9, 9)
    ref = bn_r.train()(conv_r(x))
    out = f(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert torch.allclose(f.weight.grad, conv_r.weight.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(f.bn.weight.grad, bn_r.weight.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(f.bn.bias.grad, bn_r.bias.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(f.bn.running_mean, bn_r.running_mean, atol=1e-6)
    assert torch.allclose(f.bn.running_var, bn_r.running_var, atol=1e-6)
    assert int(f.bn.num_batches_tracked) == int(bn_r.num_batches_tracked) == 1


def test_training_after_freeze_uses_frozen_moving_stats():
    conv, bn = _conv_bn(seed=2)
    f = _fold(conv, bn).train()
    f.freeze_bn()
    x = torch.randn(8, 3, 9, 9)
    mean0, var0 = f.bn.running_mean.clone(), f.bn.running_var.clone()
    out = f(x)
    ref = bn.eval()(conv(x))  # the inference graph: moving statistics
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(f.bn.running_mean, mean0) and torch.equal(f.bn.running_var, var0)
    out.sum().backward()  # gamma and beta keep training
    assert f.bn.weight.grad is not None and f.bn.weight.grad.abs().sum() > 0


def test_quantizer_sees_the_folded_weight_with_moving_sigma():
    """Fig. C.8: the weight quantizer quantizes w gamma / sigma_mv; reference: the
    hand-folded weight through torch.fake_quantize_per_tensor_affine (uint8, min-max),
    in eval and (with the batch correction sigma_mv / sigma_B) in training."""
    conv, bn = _conv_bn(seed=3)
    f = _fold(conv, bn, UniformQuantizer(8, symmetric=False, granularity="tensor")).eval()
    x = torch.randn(4, 3, 9, 9)
    sigma = torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * (bn.weight / sigma).reshape(-1, 1, 1, 1)
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    s = (hi - lo) / 255
    z = int(round(-lo / s))
    wq = torch.fake_quantize_per_tensor_affine(w, s, z, 0, 255)
    b = bn.bias - bn.weight * bn.running_mean / sigma
    ref = nn.functional.conv2d(x, wq, b, stride=2, padding=1)
    assert torch.allclose(f(x), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(f(x), bn.eval()(conv(x)), atol=1e-4)  # quantization acts
    f.train()
    y = conv(x)
    mb, vb = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    sb = torch.sqrt(vb + bn.eps)
    ref_t = (nn.functional.conv2d(x, wq, None, stride=2, padding=1) * (sigma / sb).reshape(1, -1, 1, 1)
             + (bn.bias - bn.weight * mb / sb).reshape(1, -1, 1, 1))
    assert torch.allclose(f(x), ref_t, atol=1e-5, rtol=0)


def test_linear_bn_fold():
    torch.manual_seed(4)
    lin, bn = nn.Linear(5, 7), nn.BatchNorm1d(7)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 5)
    f = FoldedLinearBN.from_linear_bn(copy.deepcopy(lin), copy.deepcopy(bn))
    assert torch.allclose(f.eval()(x), bn.eval()(lin(x)), atol=1e-5, rtol=0)
    assert torch.allclose(f.train()(x), bn.train()(lin(x)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="allowed"):
        fold_bn_layer(lin, nn.BatchNorm2d(7))


def test_pairs_found_in_resnet20_and_small_cnn():
    pairs = find_conv_bn_pairs(resnet20(tiny=True))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer2.0.conv1"] == "layer2.0.bn1" and pairs["layer3.2.conv2"] == "layer3.2.bn2"
    assert len(pairs) == 19  # every conv of ResNet-20 is followed by its BN
    assert find_conv_bn_pairs(SmallCNN(tiny=True)) == {"features.0": "features.1",
                                                       "features.3": "features.4"}
