"""CIFAR ResNet block order (qtrain.models.resnet_cifar): ``block=xnor`` is XNOR-Net's
BN -> BinActiv -> BinConv order (Rastegari et al. 2016, Fig. 3), so the binarised input of
every binary conv carries both signs; ``block=basic`` (default) is unchanged."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from qtrain.errors import ConfigError
from qtrain.models.resnet_cifar import cifar_resnet
from qtrain.nn.fake_quant import is_fake_quant
from qtrain.nn.format_quantizers import XNORActQuantizer
from tests.hydra_helpers import ROOT, compose_cfg

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _images(n=8, seed=0):
    """Smooth colour images in [0, 1] (upsampled 4x4 noise), CIFAR-normalised."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear",
                      align_corners=False)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _xnor_model(tmp_path, block):
    """The real recipe's model and quantizers (Hydra composition, smoke size), converted by
    the QAT callback as at quant_start_epoch."""
    cfg = compose_cfg(["recipe=xnor_resnet20_cifar10", "debug=smoke", f"model.block={block}"],
                      tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=10)  # dataset_info is filled in at run time
    layers = instantiate(cfg.quant).convert(model)
    return model, layers


def _binary_inputs(model, layers, x):
    """{layer: sign(I)} as each binary conv's XNORActQuantizer outputs it, and
    {layer: I} (the quantizer's input)."""
    outs, ins, hooks = {}, {}, []
    for name, m in layers.items():
        def hook(mod, args, out, name=name):
            ins[name], outs[name] = args[0].detach(), out.detach()
        hooks.append(m.act_quantizer.register_forward_hook(hook))
    model.train()
    model(x)
    for h in hooks:
        h.remove()
    return outs, ins


def test_recipe_uses_xnor_block_and_every_binary_input_has_both_signs(tmp_path):
    cfg = compose_cfg(["recipe=xnor_resnet20_cifar10"], tmp_path)
    assert cfg.model.block == "xnor"
    model, layers = _xnor_model(tmp_path, "xnor")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(layers) == set(convs) - {"conv1"}  # stem conv and fc stay full precision
    assert all(isinstance(m.act_quantizer, XNORActQuantizer) for m in layers.values())
    outs, ins = _binary_inputs(model, layers, _images())
    assert set(outs) == set(layers)
    for name, s in outs.items():
        assert set(s.unique().tolist()) == {-1.0, 1.0}, name  # binary: sign(I)
        frac = (s > 0).float().mean().item()
        assert 0.2 < frac < 0.8, (name, frac)  # normalised input: both signs, not a few
        assert torch.equal(s, torch.where(ins[name] >= 0, 1.0, -1.0)), name


def test_basic_block_order_binarises_everything_to_plus_one(tmp_path):
    # the departure the xnor block fixes: conv-BN-ReLU feeds every binary conv a ReLU
    # output >= 0, so sign() (sign(0) := +1) is +1 everywhere
    model, layers = _xnor_model(tmp_path, "basic")
    outs, _ = _binary_inputs(model, layers, _images())
    assert outs and all(bool((s == 1).all()) for s in outs.values())


def test_xnor_block_feeds_bn_output_to_sign_and_hardtanh_in_float(tmp_path):
    """Float phase: conv input = hardtanh(bn(x)) (a nonlinearity, some values clipped).
    Binarised: the quantizer takes bn(x) itself (K of eq. 11 from the unclipped |I|, as
    the authors' BinActive); with the quantizer disabled, hardtanh again."""
    torch.manual_seed(0)
    float_model = cifar_resnet("resnet20", tiny=True, block="xnor").train()
    blk = float_model.layer2[0]
    seen = {}
    blk.bn1.register_forward_hook(lambda m, a, o: seen.__setitem__("bn", o.detach()))
    blk.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv_in", a[0].detach()))
    float_model(_images())
    assert torch.equal(seen["conv_in"], F.hardtanh(seen["bn"]))
    assert (seen["bn"].abs() > 1).any()  # hardtanh is not the identity here

    model, layers = _xnor_model(tmp_path, "xnor")
    blk = model.layer2[0]
    assert is_fake_quant(blk.conv1)
    blk.bn1.register_forward_hook(lambda m, a, o: seen.__setitem__("bn", o.detach()))
    outs, ins = _binary_inputs(model, layers, _images())
    assert torch.equal(ins["layer2.0.conv1"], seen["bn"])
    assert (seen["bn"].abs() > 1).any()
    blk.conv1.act_quantizer.enabled = False
    blk.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv_in", a[0].detach()))
    model(_images())
    assert torch.equal(seen["conv_in"], F.hardtanh(seen["bn"]))


@pytest.mark.parametrize("name,n_blocks", [("resnet20", 3), ("resnet32", 5)])
@pytest.mark.parametrize("block", ["basic", "xnor"])
def test_forward_shapes(name, n_blocks, block):
    m = cifar_resnet(name, block=block)
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == n_blocks
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 6 * n_blocks + 1  # 6n + 2 layers with the fc


def test_xnor_layout_keys():
    sd = cifar_resnet("resnet20", block="xnor").state_dict()
    assert "bn1.weight" not in sd and "bn_final.weight" in sd  # stem conv without BN/ReLU
    assert sd["layer2.0.bn1.weight"].shape == (16,)  # bn1 normalises the block's input
    assert sd["layer2.0.bn2.weight"].shape == (32,)


def test_basic_block_state_dict_unchanged_loads_shipped_fp32_weights():
    ckpt = ROOT / "recipes/weights/fp32_resnet20_cifar10/last.ckpt"
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    m = cifar_resnet("resnet20", block="basic")
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    assert set(cifar_resnet("resnet20").state_dict()) == set(sd)  # basic is the default


def test_unknown_block_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"model.block='preact'.*basic.*xnor"):
        cifar_resnet("resnet20", block="preact")
