"""Gupta et al. 2015 static <IL, FL> fixed point: hand-worked values, saturation ends,
unbiased stochastic rounding (eq. 2), the module quantizer and the recipe that uses it."""

import pytest
import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d
from qtrain.nn.format_quantizers import DynamicFixedPointQuantizer, FixedPointQuantizer
from qtrain.quant.fixed_point import fake_dfp, fake_fixed, fixed_codes, fixed_range


def test_nearest_values_by_hand_and_saturation():
    # <3, 2>: step 0.25, range [-4, 3.75]
    x = torch.tensor([0.3, -0.3, 1.125, 1.375, 3.8, 5.0, -4.1, -7.0, 0.1, 3.75, -4.0])
    want = torch.tensor([0.25, -0.25, 1.0, 1.5, 3.75, 3.75, -4.0, -4.0, 0.0, 3.75, -4.0])
    # 1.125 / 0.25 = 4.5 -> 4 and 1.375 / 0.25 = 5.5 -> 6 (ties to even)
    assert torch.equal(fake_fixed(x, 3, 2, "nearest"), want)
    assert torch.equal(fixed_codes(x, 3, 2), want * 4)
    assert fixed_range(3, 2) == (-4.0, 3.75)
    assert fixed_range(4, 12) == (-8.0, 8.0 - 2.0**-12)
    assert fixed_range(2, 14) == (-2.0, 2.0 - 2.0**-14)


def test_paper_formats_grid_and_ends_unlike_dynamic_fixed_point():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1000) * 0.01, torch.tensor([50.0, -50.0, 1.99999])])
    y = fake_fixed(x, 2, 14, "nearest")
    assert torch.equal(y * 2**14, torch.round(y * 2**14))  # on the 2^-14 grid
    assert y.max().item() == 2.0 - 2.0**-14 and y.min().item() == -2.0  # saturates
    # the dynamic format would rescale to the tensor: 50 stays representable there
    assert fake_dfp(x, 16).max().item() == pytest.approx(50.0, rel=1e-3)


def test_clipped_ste_gradient():
    x = torch.tensor([0.3, 2.5, -2.5, -1.0], requires_grad=True)
    fake_fixed(x, 2, 14).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_stochastic_two_neighbours_and_probability():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3)  # <3, 2>: neighbours 0.25 and 0.5, P(up) = 0.05 / 0.25
    y = fake_fixed(x, 3, 2, "stochastic", g)
    assert set(y.unique().tolist()) == {0.25, 0.5}
    p_up = (y == 0.5).double().mean().item()
    assert abs(p_up - 0.2) < 5 * (0.2 * 0.8 / x.numel()) ** 0.5


def test_stochastic_rounding_is_unbiased_nearest_is_not():
    # E[round(x)] = x (Gupta eq. 2): the mean over draws of values off the grid converges to
    # x; 5 standard errors of the mean (sd <= eps / 2) bound it. Round-to-nearest is off by
    # up to eps / 2 per value: it fails the same bound.
    eps, n = 2.0**-12, 4000
    x = (torch.arange(1, 65, dtype=torch.float64) + torch.linspace(0.05, 0.95, 64)) * eps
    xs = x.repeat(n, 1)
    g = torch.Generator().manual_seed(1)
    bound = 5 * (eps / 2) / n**0.5
    mean_sr = fake_fixed(xs, 4, 12, "stochastic", g).mean(0)
    assert (mean_sr - x).abs().max().item() < bound
    mean_rn = fake_fixed(xs, 4, 12, "nearest").mean(0)
    assert (mean_rn - x).abs().max().item() > bound


def test_bad_formats_raise_config_error():
    with pytest.raises(ConfigError, match="int_bits"):
        fake_fixed(torch.ones(2), 0, 4)
    with pytest.raises(ConfigError, match="word length"):
        fixed_range(20, 20)
    with pytest.raises(ConfigError, match="frac_bits=16 with bits=16"):
        FixedPointQuantizer(16, frac_bits=16)
    q = FixedPointQuantizer(16, frac_bits=14)
    with pytest.raises(ConfigError, match="frac_bits=14 with bits=8"):
        q.set_bits(8)


def test_module_quantizer_in_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    wq, aq = FixedPointQuantizer(16, 14, "nearest"), FixedPointQuantizer(16, 12, "nearest")
    layer = QuantConv2d.from_float(conv, wq, aq)
    x = torch.randn(2, 3, 5, 5) * 4
    w_ref = torch.round(conv.weight.detach() * 2**14).clamp(-2**15, 2**15 - 1) / 2**14
    x_ref = torch.round(x * 2**12).clamp(-2**15, 2**15 - 1) / 2**12
    ref = torch.nn.functional.conv2d(x_ref, w_ref, conv.bias.detach(), padding=1)
    torch.testing.assert_close(layer(x), ref)
    assert (wq.int_bits, wq.frac_bits) == (2, 14)
    assert wq.storage_bits(conv.weight) == 16 * conv.weight.numel()
    assert torch.equal(wq.codes(conv.weight).float(), w_ref * 2**14)
    assert not isinstance(wq, DynamicFixedPointQuantizer)


def test_recipe_uses_the_static_format(tmp_path):
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["recipe=stochastic_rounding_fixed16_resnet20_cifar10"], tmp_path)
    cb = instantiate(cfg.quant)
    wq, aq = cb.weight_factory(bits=cb.bits), cb.act_factory(bits=cb.act_bits)
    assert isinstance(wq, FixedPointQuantizer) and isinstance(aq, FixedPointQuantizer)
    assert (wq.int_bits, wq.frac_bits, wq.rounding) == (2, 14, "stochastic")
    assert (aq.int_bits, aq.frac_bits, aq.rounding) == (4, 12, "stochastic")
    assert aq(torch.tensor([100.0])).item() == 8.0 - 2.0**-12  # saturates, not rescaled


@pytest.mark.parametrize("bits,frac_bits", [(16, 14), (8, 6)])
def test_export_round_trip_is_exact(bits, frac_bits, tmp_path):
    from qtrain.export import load_packed, pack_model, save_packed

    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    for i in (0, 2):
        net[i] = QuantConv2d.from_float(net[i], FixedPointQuantizer(bits, frac_bits, seed=0))
        with torch.no_grad():
            net[i].weight.mul_(8)  # some weights beyond 2^(IL-1): saturated codes
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    for m in (net[0], net[2]):
        m.weight_quantizer.rounding = "nearest"  # packed with round-to-nearest
    want = net(x)
    path = tmp_path / "f.safetensors"
    save_packed(pack_model(net), path)
    q = load_packed(path, net).eval()
    torch.testing.assert_close(q(x), want)
