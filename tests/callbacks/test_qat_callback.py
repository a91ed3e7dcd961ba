"""QAT callback: conversion by rules, master weights intact, math equal to PyTorch's
fake-quant ops, first/last policy, clear errors, exact resume from a checkpoint."""

import pytest
import torch
from torch import nn

from qtrain.callbacks.qat import QATCallback
from qtrain.nn.convert import LayerSelectionError
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.hydra_helpers import run


def wq(bits):
    return UniformQuantizer(bits, symmetric=True, granularity="channel")


def aq(bits):
    return UniformQuantizer(bits, symmetric=False, observer="ema")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_convert_shares_parameters_and_keeps_master_weights():
    model = net()
    w_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    cb = QATCallback(bits=4, weight=wq, act=aq, first_last="quantize")
    cb.convert(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[6], QuantLinear)
    assert {n: id(p) for n, p in model.named_parameters() if "quantizer" not in n} == ids
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    for n, p in model.named_parameters():
        if n in w_before:
            assert torch.equal(p, w_before[n]), n


def test_quant_conv_equals_pytorch_fake_quant_ops():
    model = net()
    QATCallback(bits=4, weight=wq, act=aq, first_last="quantize").convert(model)
    conv = model[2]
    x = torch.randn(2, 4, 6, 6)
    y = conv(x)
    # reference: PyTorch's own ops with the same min-max settings
    w = conv.weight.detach()
    amax = w.abs().amax(dim=(1, 2, 3))
    scale = amax / 7.5  # symmetric 4-bit: (qmax - qmin) / 2 = 7.5
    w_ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(4, dtype=torch.int32), 0, -8, 7)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s = (hi - lo) / 15
    zp = int(round(-lo / s))
    x_ref = torch.fake_quantize_per_tensor_affine(x, s, zp, 0, 15)
    y_ref = nn.functional.conv2d(x_ref, w_ref, conv.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_first_last_policies():
    for policy, expect_first in (("keep", nn.Conv2d), ("8bit", QuantConv2d)):
        model = net()
        QATCallback(bits=4, weight=wq, act=aq, first_last=policy).convert(model)
        assert type(model[0]) is expect_first and isinstance(model[2], QuantConv2d)
        if policy == "8bit":
            assert model[0].weight_quantizer.bits == 8 and model[2].weight_quantizer.bits == 4


def test_overrides_and_skip():
    model = net()
    cb = QATCallback(bits=4, weight=wq, act=None, first_last="quantize",
                     overrides={"4": {"bits": 2}, "6": {"skip": True}})
    cb.convert(model)
    assert model[4].weight_quantizer.bits == 2 and type(model[6]) is nn.Linear


def test_errors_name_the_key():
    with pytest.raises(LayerSelectionError, match="quant.include.*'fc9'"):
        QATCallback(bits=4, weight=wq, include=["fc9"]).convert(net())
    with pytest.raises(ValueError, match="quant.bits=9"):
        QATCallback(bits=9, weight=wq)
    with pytest.raises(LayerSelectionError, match="quant.overrides"):
        QATCallback(bits=4, weight=wq, overrides={"nope": {"bits": 2}}).convert(net())
    with pytest.raises(ValueError, match="allowed"):
        QATCallback(bits=4, weight=wq, first_last="sometimes")


def test_resume_matches_uninterrupted_run(tmp_path):
    common = ["recipe=qat_int4_digits", "debug=smoke", "trainer.max_epochs=3",
              "quant_start_epoch=1", "callbacks.checkpoint.save_top_k=-1",
              ]
    summary = run(common, tmp_path / "a")
    full = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    mid = sorted((tmp_path / "a" / "checkpoints").glob("epoch001-*.ckpt"))[0]
    resumed_summary = run(common + [f"ckpt_path={mid}"], tmp_path / "b")
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == full["global_step"]
    assert any("running_max" in k for k in full["state_dict"])
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    # the FP32 row tests the FP32 phase's weights: a file of the run dir that the checkpoints
    # reference (no copy inside them); the resumed run read it from run a and tests the same
    snap = "fp32_snapshot_qat.safetensors"
    assert summary["fp32_source"] == resumed_summary["fp32_source"] == "FP32 phase's last weights"
    assert resumed_summary["fp32_metric"] == summary["fp32_metric"]
    assert (tmp_path / "b" / snap).read_bytes() == (tmp_path / "a" / snap).read_bytes()
    for ck in (full, resumed):
        state = ck["callbacks"]["QATCallback"]
        assert "fp32_state" not in state and state["fp32_snapshot"]["file"] == snap


def test_float_evaluation_after_quantized_one_really_is_float(tmp_path):
    """run.py evaluates quantized, then with every quantizer disabled: the second pass must
    equal the plain float model (a callback must not re-enable quantization in test)."""
    import copy

    import pytorch_lightning as pl

    from qtrain.data.digits import DigitsDataModule
    from qtrain.modules.classification import ImageClassifier
    from qtrain.run import set_quantizers_enabled

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    float_copy = copy.deepcopy(model)
    dm = DigitsDataModule(batch_size=64, fake=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[QATCallback(bits=2, weight=wq, act=aq, first_last="quantize")])
    q = trainer.test(ImageClassifier(model), datamodule=dm, verbose=False)[0]["test_loss"]
    set_quantizers_enabled(model, False)
    f = trainer.test(ImageClassifier(model), datamodule=dm, verbose=False)[0]["test_loss"]
    ref = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)
    f_ref = ref.test(ImageClassifier(float_copy), datamodule=dm, verbose=False)[0]["test_loss"]
    assert f == pytest.approx(f_ref, rel=1e-6)
    assert abs(q - f) > 1e-3


def test_a_plain_string_pattern_is_one_regex():
    from qtrain.nn.convert import select_modules

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    # quant.include=<regex> from the command line arrives as a string: one pattern, not chars
    assert list(select_modules(model, "2", (), (nn.Linear,), "quant")) == ["2"]
    with pytest.raises(LayerSelectionError, match="pattern 'fc' matches no"):
        select_modules(model, "fc", (), (nn.Linear,), "quant")


def test_seeded_stochastic_rounding_draws_differ_between_layers_and_repeat_per_run():
    """quant.weight.seed / quant.act.seed seed one generator per layer and role (derived from
    the configured seed): the same tensor is rounded with different random draws in each
    layer (before, every layer's generator was seeded alike: identical draws, perfectly
    correlated rounding noise), and a rebuilt run draws the same again."""
    from functools import partial

    from qtrain.nn.format_quantizers import FixedPointQuantizer

    def quantized_copies():
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        fq = partial(FixedPointQuantizer, frac_bits=4, rounding="stochastic", seed=0)
        layers = QATCallback(bits=8, weight=fq, act=fq, first_last="quantize").convert(model)
        x = torch.linspace(0, 1, 4096) / 16  # within one step (2^-4): the draw decides
        return ([lay.weight_quantizer(x) for lay in layers.values()]
                + [lay.act_quantizer(x) for lay in layers.values()])

    a, b = quantized_copies(), quantized_copies()
    assert len(a) == 6
    for i in range(6):
        assert torch.equal(a[i], b[i])  # reproducible run to run
        for j in range(i):
            assert (a[i] != a[j]).float().mean() > 0.2, (i, j)  # independent draws
