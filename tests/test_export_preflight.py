"""export=true: LSQ weights pack exactly; quantizers without a packed format fail before training
(every weight quantizer of the project has one now: a bare ``Quantizer`` stands in)."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from qtrain.export import check_packable, load_packed, load_run, pack_model, save_packed
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import BinaryWeightQuantizer, TWNQuantizer
from qtrain.nn.learned_quantizers import LSQQuantizer
from qtrain.nn.packed import PackedConv2d, PackedLinear
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant.size import model_storage_bits
from tests.hydra_helpers import run


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(128, 64, 3, padding=1)
        self.lin = nn.Linear(4096, 10)  # long rows: the per-row scale copies stay < 1%

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)).repeat(1, 64))


def _lsq_net(bits=2):
    torch.manual_seed(0)
    m = Net()
    m.conv = QuantConv2d.from_float(m.conv, LSQQuantizer(bits))
    m.lin = QuantLinear.from_float(m.lin, LSQQuantizer(bits))
    return m.eval()


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_weights_pack_exactly(bits, tmp_path):
    m = _lsq_net(bits)
    x = torch.randn(2, 128, 6, 6)
    ref = m(x)  # also initialises the steps (2 mean|w| / sqrt(Qp))
    m.lin.weight_quantizer.step.data.mul_(1.3)  # a learned step, not the initial one
    ref = m(x)
    # hand check of one code: round(clamp(w / s, -Qn, Qp))
    q = m.lin.weight_quantizer.export_qparams(m.lin.weight)
    s, qn = float(m.lin.weight_quantizer.step), 2 ** (bits - 1)
    w0 = float(m.lin.weight[0, 0])
    assert int(q["codes"][0, 0]) == round(max(-qn, min(qn - 1, w0 / s)))
    save_packed(pack_model(m, scale_dtype=torch.float32), tmp_path / "m.safetensors")
    got = load_packed(tmp_path / "m.safetensors", Net()).eval()(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    summary = {r.name: r.bits for r in model_storage_bits(m).layers}
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bits_lin = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
                   if k.startswith("lin."))
    assert abs(bits_lin - summary["lin"]) / summary["lin"] < 0.01


@pytest.mark.parametrize("make", [lambda: TWNQuantizer(), lambda: TWNQuantizer(per_channel=True),
                                  lambda: BinaryWeightQuantizer()])
def test_ternary_and_binary_weights_pack(make, tmp_path):
    torch.manual_seed(0)
    m = Net()
    m.conv = QuantConv2d.from_float(m.conv, make())
    m.lin = QuantLinear.from_float(m.lin, make())
    m.eval()
    x = torch.randn(2, 128, 6, 6)
    ref = m(x)
    save_packed(pack_model(m), tmp_path / "m.safetensors")
    p = load_packed(tmp_path / "m.safetensors", Net()).eval()
    assert isinstance(p.conv, PackedConv2d) and p.lin.fmt in ("ternary", "binary")
    # the packed weight is the fake-quant weight up to alpha's fp16 rounding
    for name in ("conv", "lin"):
        fq = getattr(m, name)
        want = fq.weight_quantizer(fq.weight).reshape(fq.weight.shape[0], -1)
        got = PackedLinear.dequantize(getattr(p, name)).reshape_as(want)
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(p(x), ref, rtol=2e-3, atol=2e-3)


class NoFormat(Quantizer):
    """A weight quantizer with no packed format (all of the project's have one)."""


def test_check_packable_names_every_unpackable_layer():
    m = Net()
    m.conv = QuantConv2d.from_float(m.conv, Quantizer(8))
    m.lin = QuantLinear.from_float(m.lin, NoFormat(4))
    with pytest.raises(ValueError, match=r"2 layer\(s\).*conv \(Quantizer\), "
                                         r"lin \(NoFormat\).*LSQ.*DoReFa"):
        check_packable(m)
    check_packable(_lsq_net())  # packable: no error


def test_export_true_with_unpackable_quantizer_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"layer\(s\) have weight quantizers.*\(Quantizer\)"):
        run(["recipe=dorefa_w1a4_resnet20_cifar10", "debug=smoke", "export=true",
             "quant.weight._target_=qtrain.nn.quantizer_base.Quantizer"], tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.rglob("*.ckpt"))  # failed in on_fit_start: no step was trained


# the per-layer report's PNGs are not what these runs check (test_train_smoke draws them for
# each method): off, about half of a ResNet-20 smoke run's CPU
NO_PNG = ["callbacks.layer_report.png=false"]


def trained_fake_quant(run_dir):
    """The trained fake-quant model of a finished run: its config's model, converted by its
    config's quant callback, with the weights / buffers of its last checkpoint."""
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    model = instantiate(cfg.model)
    instantiate(cfg.quant).convert(model)
    (ckpt,) = run_dir.rglob("last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()
                           if k.startswith("model.")})
    return model.eval()


def test_pact_dorefa_recipe_exports(tmp_path):
    """PACT activations + DoReFa 4-bit weights (real Trainer run): the weights as ``lut``
    codes into the table 2 (u / 15) - 1, the trained PACT alphas in the file; load_run
    rebuilds the PACT quantizers and reproduces the trained model bit for bit."""
    s = run(["recipe=pact_w4a4_resnet20_cifar10", "debug=smoke", "export=true", *NO_PNG], tmp_path)
    path = tmp_path / "model_packed.safetensors"
    assert s["packed_layers"] > 0
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        specs = json.loads(meta["layers"])
        luts = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".lut")}  # noqa: SIM118
    assert {v["fmt"] for v in specs.values()} == {"lut"} and len(luts) == len(specs)
    levels = 2 * (torch.arange(16.0) / 15) - 1
    assert all(torch.equal(t[0], levels) for t in luts.values())
    assert {v["act_quantizer"]["type"] for v in specs.values()} == {"PACTQuantizer"}
    assert json.loads(meta["run"]) == {"recipe": "pact_w4a4_resnet20_cifar10", "bits": 4,
                                       "method": "qtrain.callbacks.qat.QATCallback",
                                       "act_bits": None}
    trained = trained_fake_quant(tmp_path)
    alphas = [m.act_quantizer.alpha for m in trained.modules()
              if isinstance(m, QuantConv2d) and m.act_quantizer is not None]
    assert alphas and all(float(a) != 10.0 for a in alphas)  # trained, not alpha_init
    loaded = load_run(tmp_path)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_lsq_recipe_exports(tmp_path):
    """LSQ weights and activations (real Trainer run): load_run rebuilds the LSQ activation
    quantizers with their trained steps and reproduces the trained model bit for bit."""
    s = run(["recipe=lsq_w2a2_resnet20_cifar10", "debug=smoke", "export=true", *NO_PNG], tmp_path)
    assert (tmp_path / "model_packed.safetensors").exists() and s["packed_layers"] > 0
    trained, loaded = trained_fake_quant(tmp_path), load_run(tmp_path)
    steps = {n: m.act_quantizer.step for n, m in loaded.named_modules()
             if getattr(m, "act_quantizer", None) is not None}
    assert steps and all(type(loaded.get_submodule(n).act_quantizer) is LSQQuantizer
                         for n in steps)
    assert all(torch.equal(st, trained.get_submodule(n).act_quantizer.step)
               for n, st in steps.items())
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert (tmp_path / "summary.json").exists()
