"""Packed export of BN-folded integer-only QAT layers (Jacob et al. 2018 sec. 3.2, eq. 14):
the packed layer holds the codes of Q(gamma w / sigma_mv) and the bias
beta + gamma (b - mu_mv) / sigma_mv, so it computes what the folded layer computes in eval."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import DataFileError
from qtrain.export import check_packable, load_packed, pack_model, save_packed
from qtrain.nn.bn_fold import FoldedConvBN
from qtrain.nn.packed import PackedConv2d, PackedLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer

W = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="minmax")
A = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="ema")


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10))


def _trained_folded_model():
    """A real QAT conversion with folding, a few training steps so BN statistics, gamma and
    beta are far from their initial values, then eval."""
    torch.manual_seed(0)
    model = _net()
    QATCallback(bits=8, weight=W, act=A, first_last="quantize", fold_bn=True).convert(model)
    assert isinstance(model[0], FoldedConvBN) and isinstance(model[1], nn.Identity)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(16, 3, 6, 6) * 2 + 0.5
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_packed_folded_layers_match_the_folded_eval_graph():
    model = _trained_folded_model()
    check_packable(model)  # folded layers are packable now (no preflight error)
    packed = pack_model(model)
    assert isinstance(packed[0], PackedConv2d) and isinstance(packed[3], PackedConv2d)
    assert isinstance(packed[7], PackedLinear)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-5, atol=1e-5)


def test_packed_weight_and_bias_are_eq14_worked_by_hand():
    """Independent reference: fold by hand (gamma w / sqrt(var + eps), beta + gamma (b - mu) /
    sqrt(var + eps)), quantize with the asymmetric uint8 min/max formula, run F.conv2d."""
    model = _trained_folded_model()
    layer = model[3]
    bn = layer.bn
    sigma = torch.sqrt(bn.running_var + bn.eps)
    w = layer.weight.detach() * (bn.weight.detach() / sigma).reshape(-1, 1, 1, 1)
    b = bn.bias.detach() + bn.weight.detach() * (layer.bias.detach() - bn.running_mean) / sigma
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    wq = (torch.clamp(torch.round(w / scale) + zp, 0, 255) - zp) * scale
    packed = pack_model(model)[3]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        xq = layer.act_quantizer(x)  # the same (calibrated) input quantizer
        want = F.conv2d(xq, wq, b, padding=1)
        torch.testing.assert_close(packed(x), want, rtol=1e-4, atol=1e-4)
        # and not the unfolded weight: the fold must change the numbers
        assert (F.conv2d(xq, layer.weight, layer.bias, padding=1) - want).abs().max() > 1e-2


def test_save_load_roundtrip_into_the_trained_and_the_float_model(tmp_path):
    model = _trained_folded_model()
    path = tmp_path / "model_packed.safetensors"
    save_packed(pack_model(model), path)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        for into in (model, _net()):  # the float architecture (load_run): its BNs are dropped
            loaded = load_packed(path, into).eval()
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
            torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    other = _net()
    other[1] = nn.Identity()  # no BatchNorm where the file's folded BN was: named
    with pytest.raises(DataFileError, match=r"0: BN-folded \(quant.fold_bn=true\) in the file"):
        load_packed(path, other)
