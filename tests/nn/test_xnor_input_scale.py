"""XNOR-Net eq. (11): binary conv = (sign(I) (*) sign(W)) . K alpha, K = A * k, checked
against a brute-force loop over output positions; the xnor recipe uses it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError
from qtrain.export import load_packed, pack_model, save_packed
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import (
    BinaryActQuantizer,
    BinaryWeightQuantizer,
    XNORActQuantizer,
)


def _sign(t):
    return torch.where(t >= 0, 1.0, -1.0)


def _brute_force(x, w, bias, stride, padding, dilation=1, groups=1):
    """Every output position: sum over the window of sign(I) sign(W) times
    K = (1 / (kh kw)) sum_window A, A = mean over the group's input channels of |I|,
    times alpha = mean |W| of the output channel; plus the bias."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    alpha = w.abs().mean(dim=(1, 2, 3))
    for b in range(n):
        for oc in range(o):
            g = oc // (o // groups)
            chans = slice(g * cg, (g + 1) * cg)
            for i in range(ho):
                for j in range(wo):
                    win = xp[b, chans, i * stride: i * stride + dilation * (kh - 1) + 1: dilation,
                             j * stride: j * stride + dilation * (kw - 1) + 1: dilation]
                    a = win.abs().mean(dim=0)  # A over the channels, (kh, kw)
                    k = a.mean()  # box filter 1 / (kh kw)
                    s = (_sign(win) * _sign(w[oc])).sum()
                    # zero padding: sign(0-pad) enters the conv as 0, not +1
                    pad_mask = torch.zeros_like(win[0])
                    ii = torch.arange(i * stride, i * stride + dilation * (kh - 1) + 1, dilation)
                    jj = torch.arange(j * stride, j * stride + dilation * (kw - 1) + 1, dilation)
                    inside_i = (ii >= padding) & (ii < h + padding)
                    inside_j = (jj >= padding) & (jj < wd + padding)
                    pad_mask = ~(inside_i[:, None] & inside_j[None, :])
                    s = s - (_sign(win) * _sign(w[oc]))[:, pad_mask].sum()
                    out[b, oc, i, j] = s * k * alpha[oc] + (0 if bias is None else bias[oc])
    return out


def _xnor_act_from_recipe(tmp_path):
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["recipe=xnor_resnet20_cifar10"], tmp_path)
    cb = instantiate(cfg.quant)
    return cb.weight_factory(bits=cb.bits), cb.act_factory(bits=cb.act_bits)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0)])
def test_recipe_binary_conv_is_eq11(stride, padding, tmp_path):
    wq, aq = _xnor_act_from_recipe(tmp_path)  # conf/quant/xnor.yaml's quantizers
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    layer = QuantConv2d.from_float(conv, wq, aq)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    layer.double()
    ref = _brute_force(x, conv.weight.detach(), conv.bias.detach(), stride, padding)
    torch.testing.assert_close(layer(x), ref)


def test_grouped_dilated_conv_is_eq11_per_group():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2, groups=2, bias=False).double()
    layer = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1), XNORActQuantizer(1))
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    ref = _brute_force(x, conv.weight.detach(), None, 1, 2, dilation=2, groups=2)
    torch.testing.assert_close(layer(x), ref)


def test_linear_gets_mean_abs_per_sample():
    torch.manual_seed(2)
    lin = nn.Linear(5, 3)
    layer = QuantLinear.from_float(lin, BinaryWeightQuantizer(1), XNORActQuantizer(1))
    x = torch.randn(4, 5)
    w = lin.weight.detach()
    wb = w.abs().mean(1, keepdim=True) * _sign(w)
    ref = (_sign(x) @ wb.T) * x.abs().mean(1, keepdim=True) + lin.bias.detach()
    torch.testing.assert_close(layer(x), ref)


def test_act_scaling_none_is_bnn_sign_and_disabled_is_float():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    plain = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1), BinaryActQuantizer(1))(x)
    none = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1),
                                  XNORActQuantizer(1, act_scaling="none"))(x)
    assert torch.equal(none, plain)
    k_layer = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1), XNORActQuantizer(1))
    assert not torch.allclose(k_layer(x), plain)
    for q in k_layer.quantizers():
        q.enabled = False
    torch.testing.assert_close(k_layer(x), conv(x))
    with pytest.raises(ConfigError, match="act_scaling='k'; allowed"):
        XNORActQuantizer(1, act_scaling="k")


def test_k_gradient_reaches_the_input():
    # d/dI of (sign(I) (*) sign(W)) K alpha: the clipped STE term plus the K term, which
    # also reaches inputs outside [-1, 1] (where the STE term is 0)
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
    layer = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1), XNORActQuantizer(1))
    x = torch.tensor([[[[3.0, -0.5]]]], requires_grad=True)
    layer(x).sum().backward()
    # y = sign(x) |x| * 0.5 = 0.5 x per position; STE part: 0.5 |x| 1[|x|<=1] ; K part:
    # 0.5 sign(x) sign(x) = 0.5
    torch.testing.assert_close(x.grad, torch.tensor([[[[0.5, 0.75]]]]))


def test_export_keeps_k(tmp_path):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    ref_net = nn.Sequential(*[m for m in net])
    for i in (0, 2):
        ref_net[i] = QuantConv2d.from_float(net[i], BinaryWeightQuantizer(1), XNORActQuantizer(1))
    ref_net.eval()
    x = torch.randn(2, 3, 8, 8)
    want = ref_net(x)
    path = tmp_path / "x.safetensors"
    save_packed(pack_model(ref_net), path)
    got = load_packed(path, ref_net).eval()(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_k_as_a_constant_option():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
    layer = QuantConv2d.from_float(conv, BinaryWeightQuantizer(1),
                                   XNORActQuantizer(1, scale_grad=False))
    x = torch.tensor([[[[3.0, -0.5]]]], requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[[0.0, 0.25]]]]))  # the STE term only
