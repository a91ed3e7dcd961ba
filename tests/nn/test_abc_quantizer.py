"""ABC-Net quantizer modules (qtrain.nn.abc_quantizer) through the real QAT callback, Hydra
composition, Trainer and packed export: conversion, learned v / beta, the packed ``lut``
round trip (packed output == fake-quant output) and clear errors."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from qtrain.errors import ConfigError
from qtrain.export import load_packed, load_run, pack_model
from qtrain.nn.abc_quantizer import ABCActQuantizer, ABCWeightQuantizer
from qtrain.nn.fake_quant import is_fake_quant
from qtrain.quant import abc as A
from tests.hydra_helpers import compose_cfg, run


def _abc_layers(model):
    return {n: m for n, m in model.named_modules() if is_fake_quant(m)}


def test_conf_builds_m_n_bases_first_last_float(tmp_path):
    cfg = compose_cfg(["recipe=abc_m3n3_digits", "debug=smoke"], tmp_path)
    model = instantiate(cfg.model, num_classes=10)  # dataset_info is filled in at run time
    first, *_, last = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    instantiate(cfg.quant).convert(model)
    layers = _abc_layers(model)
    assert layers and first not in layers and last not in layers  # first / last full precision
    for m in layers.values():
        assert isinstance(m.weight_quantizer, ABCWeightQuantizer) and m.weight_quantizer.bits == 3
        assert isinstance(m.act_quantizer, ABCActQuantizer) and m.act_quantizer.v.shape == (3,)
    cfg = compose_cfg(["recipe=abc_m3n3_digits", "debug=smoke", "quant.bits=5", "quant.act=null"],
                      tmp_path)
    model = instantiate(cfg.model, num_classes=10)
    instantiate(cfg.quant).convert(model)
    assert all(m.act_quantizer is None and m.weight_quantizer.bits == 5
               for m in _abc_layers(model).values())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 6, 3, padding=1)
        self.f1 = nn.Linear(6 * 16, 10)
        self.f2 = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.c1(torch.relu(self.c0(x))))
        return self.f2(torch.relu(self.f1(x.flatten(1))))


def _converted(m, n, per_channel=False):
    from qtrain.callbacks.qat import QATCallback

    torch.manual_seed(0)
    net = _Net()
    QATCallback(bits=m, act_bits=n, first_last="keep",
                weight=lambda bits: ABCWeightQuantizer(bits, per_channel=per_channel),
                act=lambda bits: ABCActQuantizer(bits)).convert(net)
    return net.eval()


@pytest.mark.parametrize(("m", "n", "pc"), [(3, 3, False), (5, 5, False), (2, 1, True)])
def test_packed_model_equals_fake_quant_model(m, n, pc):
    net = _converted(m, n, pc)
    x = torch.rand(5, 2, 4, 4) * 2
    with torch.no_grad():
        net.c1.act_quantizer.v.add_(torch.linspace(-0.1, 0.1, n))  # "trained" values
        ref = net(x)
    packed = pack_model(net, backend="torch")
    for name in ("c1", "f1"):
        layer, fq = packed.get_submodule(name), net.get_submodule(name)
        assert layer.fmt == "lut" and layer.bits == m
        w_hat = fq.weight_quantizer(fq.weight).detach().reshape(layer.out_features, -1)
        assert torch.equal(layer.dequantize(), w_hat)  # bit-exact weights
        codes, _ = fq.weight_quantizer.packed_codes(fq.weight)
        assert int(codes.max()) < 2**m
    with torch.no_grad():
        torch.testing.assert_close(packed(x), ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ref, _Net.forward(_unquantized(net), x))  # not a no-op


def _unquantized(net):
    import copy

    out = copy.deepcopy(net)
    for m in _abc_layers(out).values():
        for q in m.quantizers():
            q.enabled = False
    return out


def test_storage_bits_counts_m_planes_and_alphas():
    w = torch.randn(8, 4, 3, 3)
    assert ABCWeightQuantizer(3).storage_bits(w) == 3 * w.numel() + 3 * 32
    assert ABCWeightQuantizer(2, per_channel=True).storage_bits(w) == 2 * w.numel() + 2 * 32 * 8


def test_bad_settings_raise_one_clear_error():
    with pytest.raises(ConfigError, match=r"bits=9 is not supported; allowed: 1\.\.8"):
        ABCWeightQuantizer(9)
    with pytest.raises(ConfigError, match=r"v_init must have N = bits = 3 values"):
        ABCActQuantizer(3, v_init=[0.0, 0.1])
    with pytest.raises(ConfigError, match="per_channel must be true or false"):
        ABCWeightQuantizer(3, per_channel="yes")
    with pytest.raises(ConfigError, match="N = bits is fixed"):
        ABCActQuantizer(3).set_bits(5)
    with pytest.raises(ConfigError, match="ste_gain must be > 0"):
        ABCActQuantizer(2, ste_gain=0)


def test_smoke_run_learns_v_beta_and_exports_bit_planes(tmp_path):
    """A real Trainer run (smoke data): v and beta are trained by the optimizer, the packed
    file holds M-bit lut codes whose table is sum_i alpha_i (2 bit_i - 1) of the trained
    weight, and the packed model (load_run from the file alone, or load_packed into the trained
    model) reproduces the fake-quant outputs."""
    s = run(["recipe=abc_m3n3_digits", "debug=smoke", "export=true"], tmp_path)
    assert s["packed_layers"] > 0
    cfg = OmegaConf.load(tmp_path / "config_resolved.yaml")
    model = instantiate(cfg.model)
    instantiate(cfg.quant).convert(model)
    (ckpt,) = tmp_path.rglob("last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    fresh = ABCActQuantizer(3)
    moved = [not torch.equal(m.act_quantizer.v, fresh.v) or not torch.equal(m.act_quantizer.beta, fresh.beta)
             for m in _abc_layers(model).values()]
    assert any(moved)
    path = tmp_path / "model_packed.safetensors"
    with safe_open(str(path), framework="pt") as f:
        specs = json.loads(f.metadata()["layers"])
        luts = {k[: -len(".lut")]: f.get_tensor(k) for k in f.keys() if k.endswith(".lut")}  # noqa: SIM118
    assert specs and {v["fmt"] for v in specs.values()} == {"lut"}
    for name, lut in luts.items():
        fq = model.get_submodule(name)
        bases = A.weight_bases(fq.weight, A.weight_shifts(3))
        table = A.code_table(A.lstsq_alpha(fq.weight, bases))
        assert torch.equal(lut[0, :8], table)
    x = torch.rand(4, 1, 8, 8) * 4
    with torch.no_grad():
        ref = model(x)
        # load_run rebuilds the ABC activation quantizers from the file (trained v / beta)
        torch.testing.assert_close(load_run(tmp_path, backend="torch")(x), ref, rtol=1e-6, atol=1e-6)
        loaded = load_packed(path, model, backend="torch")
        torch.testing.assert_close(loaded(x), ref, rtol=1e-6, atol=1e-6)
