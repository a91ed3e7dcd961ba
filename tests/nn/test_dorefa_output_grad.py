"""DoReFa-Net gradient quantization (Zhou et al. 2016, Alg. 1 / eq. 12; tensorpack applies
``fg`` right after each quantized conv, before BatchNorm): in a real conv-BN-ReLU stack the
error entering every quantized convolution's backward is k-bit per sample."""

import pytest
import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d
from qtrain.nn.learned_quantizers import DoReFaActQuantizer, DoReFaWeightQuantizer
from qtrain.quant import estimators as E


def _conv_backward_inputs(loss):
    """Register pre-hooks on every ConvolutionBackward node: they record the gradient that
    enters the convolution's backward GEMMs (the error w.r.t. the conv's own output)."""
    seen, grads, stack = set(), [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Convolution" in node.name():
            node.register_prehook(lambda gouts, _g=grads: _g.append(gouts[0].detach().clone()))
        stack.extend(n for n, _ in node.next_functions)
    return grads


def _block(wq, aq_factory, k):
    torch.manual_seed(0)
    c1 = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1, bias=False), wq(),
                                aq_factory(seed=1))
    c2 = QuantConv2d.from_float(nn.Conv2d(8, 6, 3, padding=1, bias=False), wq(),
                                aq_factory(seed=2))
    return nn.Sequential(c1, nn.BatchNorm2d(8), nn.ReLU(), c2, nn.BatchNorm2d(6), nn.ReLU())


def _levels_per_sample(g):
    m = g.abs().amax(dim=(1, 2, 3), keepdim=True)
    return [torch.unique(row).numel() for row in (g / m).flatten(1)]


def _dorefa_act_factory_from_recipe(tmp_path, k):
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["recipe=dorefa_w1a4_resnet20_cifar10", f"quant.act.grad_bits={k}"],
                      tmp_path)
    cb = instantiate(cfg.quant)
    return lambda seed: cb.act_factory(bits=cb.act_bits, seed=seed)


@pytest.mark.parametrize("k", [2, 3])
def test_error_entering_each_conv_is_k_bit(k, tmp_path):
    act = _dorefa_act_factory_from_recipe(tmp_path, k)  # conf/quant/dorefa.yaml's quantizer
    net = _block(lambda: DoReFaWeightQuantizer(2), act, k)
    x = torch.rand(4, 3, 6, 6) * 1.2
    target = torch.randn(4, 6, 6, 6)
    loss = (net(x) * target).sum()
    grads = _conv_backward_inputs(loss)
    loss.backward()
    assert len(grads) == 2
    for g in grads:
        assert g.abs().amax(dim=(1, 2, 3)).min() > 0
        levels = _levels_per_sample(g)
        assert max(levels) <= 2**k, levels  # full-precision errors take ~N*C*H*W values
        # on eq. (12)'s grid: g / (2 max) + 1/2 = i / (2^k - 1)
        m = g.abs().amax(dim=(1, 2, 3), keepdim=True)
        v = (g / (2 * m) + 0.5) * (2**k - 1)
        torch.testing.assert_close(v, torch.round(v), rtol=0, atol=1e-4)


def test_equals_eq12_of_the_batchnorm_gradient():
    # independent re-derivation of tensorpack's fg: capture dL/dy at the conv output (what
    # BatchNorm's backward produces), apply eq. (12) with the same seeded noise, compare with
    # what entered the convolution's backward
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 5, 3, bias=False), DoReFaWeightQuantizer(1),
                                  DoReFaActQuantizer(4, grad_bits=2, seed=7))
    bn = nn.BatchNorm2d(5)
    x = torch.rand(3, 3, 5, 5)
    y = conv(x)
    y.retain_grad()
    loss = (torch.relu(bn(y)) * torch.randn(3, 5, 3, 3)).sum()
    grads = _conv_backward_inputs(loss)
    loss.backward()
    want = E.quantize_gradient_value(y.grad, 2, per_sample=True,
                                     generator=torch.Generator().manual_seed(7))
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], want)
    assert torch.unique(y.grad).numel() > 50  # BN's gradient itself is full precision


def test_input_option_and_disabled_and_bad_value():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 5, 3, bias=False), DoReFaWeightQuantizer(1),
                                  DoReFaActQuantizer(4, grad_bits=2, seed=7, grad_at="input"))
    x = torch.rand(3, 3, 5, 5)
    loss = (torch.relu(nn.BatchNorm2d(5)(conv(x))) * torch.randn(3, 5, 3, 3)).sum()
    grads = _conv_backward_inputs(loss)
    loss.backward()
    assert max(_levels_per_sample(grads[0])) > 2**2  # the old place: the conv sees float
    for q in conv.quantizers():
        q.enabled = False
    y = conv(x)
    assert y.grad_fn.name().startswith("Convolution")  # FP32 phase: no gradient quantizer
    with pytest.raises(ConfigError, match="grad_at='before'"):
        DoReFaActQuantizer(4, grad_bits=2, grad_at="before")
