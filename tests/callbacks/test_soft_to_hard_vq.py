"""Soft-to-hard VQ (Agustsson et al. 2017): soft assignments and the histogram entropy
estimate H(p, q~) worked by hand, the hard mode against a brute-force loop, and the callback
in a real Lightning Trainer (sigma really annealed on the schedule, the rate term really in
the loss, hard assignments really used at the end)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks.soft_to_hard_vq import SoftToHardVQCallback
from qtrain.errors import ConfigError
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.learned_quantizers import SoftToHardVQ
from tests.callbacks.tiny_lightning import image_loader, trainer


def scalar_vq(centers, sigma, bits=1) -> SoftToHardVQ:
    q = SoftToHardVQ(bits=bits, dim=1, sigma=sigma)
    with torch.no_grad():
        q.centers.copy_(torch.tensor(centers, dtype=torch.float32).reshape(-1, 1))
        q.initialized.fill_(True)
    return q


def test_soft_assignment_and_entropy_by_hand():
    # z = 0, 0.1, 0.9, 1.0; centers 0, 1; sigma = 2
    q = scalar_vq([0.0, 1.0], sigma=2.0)
    z = torch.tensor([0.0, 0.1, 0.9, 1.0])
    phi = q.assignments(q.subvectors(z)).detach().double().numpy()
    # phi_0(z) = e^{-2 z^2} / (e^{-2 z^2} + e^{-2 (z-1)^2})
    zn = np.array([0.0, 0.1, 0.9, 1.0])
    a, b = np.exp(-2 * zn**2), np.exp(-2 * (zn - 1) ** 2)
    np.testing.assert_allclose(phi, np.stack([a / (a + b), b / (a + b)], 1), rtol=1e-6)
    # hard histogram p = (1/2, 1/2); soft histogram q~ = mean phi
    qt = (np.stack([a / (a + b), b / (a + b)], 1)).mean(0)
    h_ref = -(0.5 * np.log2(qt[0]) + 0.5 * np.log2(qt[1]))
    assert q.soft_entropy(z).item() == pytest.approx(h_ref, rel=1e-6)
    assert q.hard_entropy(z).item() == pytest.approx(1.0)
    # the forward value is the hard one: the nearest center
    assert torch.equal(q(z), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_soft_entropy_is_an_upper_bound_that_tightens_with_sigma_and_has_the_fd_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, generator=g, dtype=torch.float64)
    q = scalar_vq([-1.5, -0.5, 0.5, 1.5], sigma=1.0, bits=2).double()
    hp = q.hard_entropy(z).item()
    hs = []
    for s in (0.5, 2.0, 8.0, 64.0, 1e4):
        q.anneal(s)
        hs.append(q.soft_entropy(z).item())
    assert all(h >= hp - 1e-9 for h in hs)  # H(p, q~) = H(p) + KL(p || q~)
    assert hs == sorted(hs, reverse=True) and hs[-1] == pytest.approx(hp, abs=1e-6)
    # gradient w.r.t. the weights: central finite differences of the same formula (p fixed)
    q.anneal(2.0)
    x = z.clone().requires_grad_()
    q.soft_entropy(x).backward()
    eps = 1e-6
    for i in (0, 17, 123):
        zp, zm = z.clone(), z.clone()
        zp[i] += eps
        zm[i] -= eps
        fd = (q.soft_entropy(zp) - q.soft_entropy(zm)).item() / (2 * eps)
        assert x.grad[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_hard_mode_brute_force():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=g)
    q = scalar_vq([-1.0, -0.2, 0.3, 1.2], sigma=3.0, bits=2)
    up = torch.randn(6, 4, generator=g)
    # soft mode: the weights get the soft gradient
    ws = w.clone().requires_grad_()
    (q(ws) * up).sum().backward()
    assert ws.grad.abs().sum() > 0
    q.set_hard(True)
    q.centers.grad = None
    wh = w.clone().requires_grad_()
    out = q(wh)
    (out * up).sum().backward()
    c = q.centers.detach().reshape(-1)
    near = [int(np.argmin([abs(float(v) - float(cc)) for cc in c])) for v in w.reshape(-1)]
    assert torch.equal(out.detach().reshape(-1), c[near])
    assert wh.grad is None  # hard: no gradient reaches the weights
    ref = torch.zeros(4)
    for k, j in enumerate(near):
        ref[j] += up.reshape(-1)[k]
    torch.testing.assert_close(q.centers.grad.reshape(-1), ref)
    assert torch.equal(q.codes(w).reshape(-1), torch.tensor(near))


# ---------------------------------------------------------------- callback, real Trainer
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Probe(pl.Callback):
    """Records sigma, hard flags and the quantized weights (runs after the method callback)."""

    def __init__(self):
        self.sigma, self.hard, self.w = [], [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        q = pl_module.model.fc.weight_quantizer
        self.sigma.append(float(q.sigma))
        self.hard.append(bool(q.hard))

    def on_train_epoch_start(self, trainer, pl_module):
        m = pl_module.model
        self.w[trainer.current_epoch] = (m.fc.weight.detach().clone(),
                                         m.fc.weight_quantizer.centers.detach().clone())


def fit(cb, epochs=4):
    torch.manual_seed(0)
    module = ImageClassifier(Net(), num_classes=4,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    probe = Probe()
    t = trainer(max_epochs=epochs, callbacks=[cb, probe], limit_val_batches=0)
    t.fit(module, image_loader(n=32, batch=8))
    return module, probe


def test_callback_anneals_sigma_adds_rate_and_ends_hard():
    cb = SoftToHardVQCallback(bits=2, sigma_start=0.5, sigma_end=50.0, beta=0.1, hard_epochs=1,
                              start_epoch=1, first_last="quantize")
    module, probe = fit(cb, epochs=4)
    # 4 batches per epoch; epoch 0 float, epochs 1-2 soft (T = 8 steps), epoch 3 hard
    steps = probe.sigma[4:12]
    ref = [0.5 * 100.0 ** (t / 8) for t in range(8)]
    np.testing.assert_allclose(steps, ref, rtol=1e-5)
    assert probe.hard[:12] == [False] * 12 and probe.hard[12:] == [True] * 4
    # hard epoch: the weights of the quantized layers stay fixed, the centers move
    w_before, c_before = probe.w[3]
    m = module.model
    assert torch.equal(m.fc.weight.detach(), w_before)
    assert not torch.equal(m.fc.weight_quantizer.centers.detach(), c_before)
    # soft epochs: the weights trained
    assert not torch.equal(probe.w[1][0], probe.w[2][0])
    # after fit: hard, and the loss hook is gone
    assert cb.is_hard() and module.loss_hook is None
    for layer in (m.conv, m.fc):
        q = layer.weight_quantizer
        c = q.centers.detach().reshape(-1)
        idx = (layer.weight.detach().reshape(-1, 1) - c).abs().argmin(1)
        assert torch.equal(layer.quantized_weight().detach().reshape(-1), c[idx])


def test_loss_hook_adds_beta_times_symbol_weighted_soft_entropy():
    cb = SoftToHardVQCallback(bits=2, sigma_start=3.0, sigma_end=3.0, beta=0.25,
                              first_last="quantize")
    module = ImageClassifier(Net(), num_classes=4)
    cb.convert(module.model)
    m = module.model
    for layer in (m.conv, m.fc):
        layer.weight_quantizer(layer.weight)  # initialise the centers
    total = cb.loss_hook(module, None, None, torch.tensor(1.0))
    # by hand (numpy): per layer H(p, q~), weighted by its number of weights
    hs, ns = [], []
    for layer in (m.conv, m.fc):
        w = layer.weight.detach().double().numpy().reshape(-1)
        c = layer.weight_quantizer.centers.detach().double().numpy().reshape(-1)
        d2 = (w[:, None] - c[None, :]) ** 2
        e = np.exp(-3.0 * (d2 - d2.min(1, keepdims=True)))
        phi = e / e.sum(1, keepdims=True)
        p = np.bincount(d2.argmin(1), minlength=4) / len(w)
        qt = phi.mean(0)
        hs.append(-(p[p > 0] * np.log2(qt[p > 0])).sum())
        ns.append(len(w))
    ref = 1.0 + 0.25 * (hs[0] * ns[0] + hs[1] * ns[1]) / sum(ns)
    assert total.item() == pytest.approx(ref, rel=1e-5)
    # hard: no rate term
    cb.set_hard(True)
    assert cb.loss_hook(module, None, None, torch.tensor(1.0)).item() == 1.0


def test_bad_settings():
    with pytest.raises(ConfigError, match="sigma_start"):
        SoftToHardVQCallback(sigma_start=10.0, sigma_end=1.0)
    with pytest.raises(ConfigError, match="quant.beta"):
        SoftToHardVQCallback(beta=-1)
    with pytest.raises(ConfigError, match="hard_epochs"):
        SoftToHardVQCallback(hard_epochs=-1)
    with pytest.raises(ConfigError, match="sigma_units"):
        SoftToHardVQCallback(sigma_units="relative")
    assert math.isfinite(SoftToHardVQCallback().sigma_at(5, 10))
    cb = SoftToHardVQCallback(bits=2, first_last="quantize")
    module = ImageClassifier(Net(), num_classes=4)
    with pytest.raises(ConfigError, match="max_epochs >= 1"):
        trainer(max_epochs=-1, max_steps=3, callbacks=[cb]).fit(module, image_loader(n=16))
