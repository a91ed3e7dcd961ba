"""Merolla et al. 2016 weight-distortion callback: the forward pass really uses the projected
weight (every step, a new draw for the random projections), the gradient reaches the float
weight, train and test projections are independent, float weights are clipped, effective
bits match a numpy entropy, bad settings are one clear error, and a real Hydra run reports the
effective bits in its summary."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.callbacks.weight_distortion import WeightDistortionCallback
from qtrain.errors import ConfigError
from qtrain.nn.distortion_quantizer import WeightDistortionQuantizer
from qtrain.quant.size import model_huffman_bits, model_storage_bits
from tests.callbacks.tiny_lightning import image_loader, trainer
from tests.hydra_helpers import run


class Net(pl.LightningModule):
    metric = "acc"

    def __init__(self, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def record(cb, store):
    """Forward hooks on every distortion quantizer: (training flag, input, output) per call."""
    for name, q in cb.quantizers().items():
        q.register_forward_hook(lambda m, args, out, name=name: store.append(
            (name, m.training, args[0].detach().clone(), out.detach().clone())))


def test_quantizer_forward_is_the_projection_and_the_gradient_reaches_the_float_weight():
    w = nn.Parameter(torch.randn(6, 5))
    before = w.detach().clone()
    q = WeightDistortionQuantizer(train="binary").train()
    out = q(w)
    alpha = before.abs().max()
    assert torch.equal(out, alpha * torch.where(before >= 0, 1.0, -1.0))  # exactly +-alpha
    g = torch.randn(6, 5)
    out.backward(g)
    assert torch.equal(w.grad, g)  # BinaryConnect: dL/dP(w) applied to w
    assert torch.equal(w.detach(), before)  # the float weight is never overwritten


@pytest.mark.parametrize("projection", ["stochastic_binary", "mult_noise", "add_noise",
                                        "stochastic_multiply"])
def test_random_training_draw_changes_every_step_and_test_draw_is_fixed(projection):
    w = nn.Parameter(torch.randn(8, 8))
    w0 = w.detach().clone()
    q = WeightDistortionQuantizer(train=projection, seed=3).train()
    a, b = q(w).detach(), q(w).detach()
    assert not torch.equal(a, b) and int(q.step) == 2  # a new draw every step: no no-op
    assert not torch.equal(a, w.detach())
    q.eval()
    e1, e2 = q(w), q(w)
    assert torch.equal(e1, e2)  # one distorted network per evaluation
    with torch.no_grad():
        w.add_(0.01)  # an optimizer step: new weight version -> new draw
    assert not torch.equal(q(w), e1)
    # reproducible from the seed
    q2 = WeightDistortionQuantizer(train=projection, seed=3).train()
    with torch.no_grad():
        w.copy_(w0)
    assert torch.equal(q2(w).detach(), a)


def test_layers_get_their_own_random_stream():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)
    cb = WeightDistortionCallback(train={"projection": "stochastic_binary"}, seed=0)
    cb.convert(model)
    q0, q1 = model[0].weight_quantizer, model[1].weight_quantizer
    assert q0.seed != q1.seed
    assert not torch.equal(q0(model[0].weight), q1(model[1].weight))


def test_storage_and_huffman_follow_the_test_projection():
    for test, bits in (({"projection": "binary"}, 1), ({"projection": "kquant", "levels": 3}, 2),
                       ({"projection": "add_noise"}, 32)):
        model = nn.Sequential(nn.Linear(20, 10, bias=False))
        WeightDistortionCallback(train="none", test=test).convert(model)
        dense = model_storage_bits(model).total_bits
        assert dense == 200 * bits + (32 if bits < 32 else 0)
        assert 0 < model_huffman_bits(model).total_bits <= dense


def test_trainer_binary_training_clips_and_reports_effective_bits():
    module = Net()
    cb = WeightDistortionCallback(train={"projection": "binary"}, test={"projection": "binary"},
                                  clip_weights=0.5, clip_scale="init_std")
    calls = []
    tr = trainer(max_epochs=2, callbacks=[cb], limit_val_batches=1)
    cb.setup(tr, module, "fit")
    record(cb, calls)
    w0 = {n: m.weight.detach().clone() for n, m in cb.layers.items()}
    bounds = {n: 0.5 * float(w.std()) for n, w in w0.items()}
    tr.fit(module, image_loader(), image_loader(seed=1))
    train_calls = [c for c in calls if c[1]]
    assert len(train_calls) == 2 * 4 * 2  # 2 layers x 4 steps x 2 epochs: every step projected
    for name, _, w, out in train_calls:
        alpha = w.abs().max()
        assert set(torch.unique(out).tolist()) <= {float(-alpha), float(alpha)}, name
    for name, m in cb.layers.items():
        assert cb.clip_bounds[name] == pytest.approx(bounds[name])
        assert float(m.weight.detach().abs().max()) <= bounds[name] + 1e-7
        assert not torch.equal(m.weight.detach(), w0[name])  # training moved the float weights
    res = tr.test(module, image_loader(seed=2), verbose=False)[0]
    ref = {}
    for name, m in cb.layers.items():
        s = (m.weight.detach() >= 0).float().mean().item()
        ref[name] = -sum(p * math.log2(p) for p in (s, 1 - s) if p > 0)
    sizes = {n: m.weight.numel() for n, m in cb.layers.items()}
    want = sum(ref[n] * sizes[n] for n in ref) / sum(sizes.values())
    assert res["test_effective_bits"] == pytest.approx(want, rel=1e-6)
    assert cb.effective_bits == pytest.approx(want, rel=1e-6) and cb.effective_bits <= 1.0


def test_trainer_float_training_only_tested_distorted():
    module = Net()
    cb = WeightDistortionCallback(train={"projection": "none"},
                                  test={"projection": "kquant", "levels": 3}, clip_weights=None)
    calls = []
    tr = trainer(max_epochs=1, callbacks=[cb], limit_val_batches=1)
    cb.setup(tr, module, "fit")
    record(cb, calls)
    tr.fit(module, image_loader(), image_loader(seed=1))
    assert any(c[1] for c in calls) and any(not c[1] for c in calls)
    for _, training, w, out in calls:
        if training:
            assert torch.equal(out, w)  # float training
        else:
            alpha = float(w.abs().max())
            assert set(torch.unique(out).tolist()) <= {-alpha, 0.0, alpha}


def test_trainer_mixture_projects_some_steps_and_not_others():
    module = Net()
    cb = WeightDistortionCallback(train={"projection": "mixture", "rule": "binary",
                                         "p": 0.5}, clip_weights=None, seed=1)
    calls = []
    tr = trainer(max_epochs=5, callbacks=[cb], limit_val_batches=0)
    cb.setup(tr, module, "fit")
    record(cb, calls)
    tr.fit(module, image_loader())
    projected = []
    for _, training, w, out in calls:
        assert training
        alpha = w.abs().max()
        binary = bool(torch.all((out == alpha) | (out == -alpha)))
        assert binary or torch.equal(out, w)  # a whole layer either way
        projected.append(binary)
    assert len(projected) == 2 * 4 * 5
    assert 0.3 < np.mean(projected) < 0.7  # p = 0.5 of 40 layer-steps (4.4 sd margin)


@pytest.mark.parametrize("kw, match", [
    ({"train": {"projection": "ternary"}}, r"quant\.train\.projection='ternary'; allowed"),
    ({"test": {"projection": "mixture"}}, r"quant\.test\.projection=.*training-only"),
    ({"train": {"projection": "stochastic_multiply", "gamma": 1.5}}, r"quant\.train\.gamma"),
    ({"train": {"projection": "kquant", "levels": 1}}, r"quant\.train\.levels"),
    ({"train": {"sigma": -1}}, r"quant\.train\.sigma=-1; allowed: >= 0"),
    ({"train": {"levles": 3}}, r"quant\.train: keys \['levles'\] unknown"),
    ({"clip_weights": -1.0}, r"quant\.clip_weights=-1\.0"),
    ({"clip_scale": "max"}, r"quant\.clip_scale='max'"),
    ({"scale": "l2"}, r"quant\.scale='l2'"),
])
def test_bad_settings_are_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        WeightDistortionCallback(**kw)


@pytest.mark.slow
def test_hydra_run_reports_effective_bits_in_the_summary(tmp_path):
    s = run(["recipe=merolla_distortions_digits", "debug=smoke", "quant.train.projection=binary",
             "quant.test.projection=add_noise", "quant.test.sigma=0.8"], tmp_path)
    assert s["effective_bits"] == pytest.approx(0.5 * math.log2(1 + 1 / 0.64), rel=1e-9)
    assert s["quant_metric"] is not None and s["float_weights_metric"] is not None
