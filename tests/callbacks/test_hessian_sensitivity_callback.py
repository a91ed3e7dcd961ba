"""HessianSensitivity callback in a real (CPU) pl.Trainer run on a tiny fake-quant MLP."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qtrain.callbacks.hessian_sensitivity as hs_mod
from qtrain.callbacks.hessian_sensitivity import HessianSensitivity
from qtrain.nn.convert import convert
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 32), nn.Tanh(),
            nn.Linear(32, 4),
        )
        convert(self.net, lambda n, m: FAKE_QUANT_TYPES[type(m)].from_float(
            m, UniformQuantizer(8, granularity="channel")))
        self.bn_at_train_start = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_fit_start(self):
        self.bn_fit_start = {k: v.clone() for k, v in self.net[1].state_dict().items()}

    def on_train_start(self):  # runs after the callbacks' on_train_start
        self.bn_at_train_start = {k: v.clone() for k, v in self.net[1].state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(tmp_path, cb, epochs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=2, num_sanity_val_steps=1,
    )


LAYERS = ["net.0", "net.3", "net.5"]
NUMEL = {"net.0": 128, "net.3": 512, "net.5": 128}


def test_callback_on_train_start_applies_bits_writes_files_keeps_bn(tmp_path):
    model = Tiny()
    cb = HessianSensitivity(method="hawq_v2", num_batches=3, average_bits=3.5,
                            bit_choices=(2, 4, 8), tol=0.3, max_iter=40, seed=0, mode="train")
    t = trainer(tmp_path, cb, 1)
    t.fit(model, loader(), loader())
    assert cb.done and set(cb.bits) == set(LAYERS)
    for n in LAYERS:
        assert model.get_submodule(n).weight_quantizer.bits == cb.bits[n]
    assert sum(NUMEL[n] * cb.bits[n] for n in LAYERS) <= 3.5 * sum(NUMEL.values())
    assert len(set(cb.bits.values())) > 1  # a budget of 3.5 avg bits forces a mix
    # BN running statistics untouched by the analysis (it ran before the module's hook)
    for k, v in model.bn_fit_start.items():
        torch.testing.assert_close(model.bn_at_train_start[k], v, rtol=0, atol=0)
    out = tmp_path / "lightning_logs" / "version_0"
    for ext in ("csv", "json", "png"):
        assert (out / f"hessian_sensitivity.{ext}").stat().st_size > 0
    data = json.loads((out / "hessian_sensitivity.json").read_text())
    assert {r["layer"]: r["bits"] for r in data["layers"]} == cb.bits
    assert (out / "hessian_sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_callback_after_fp32_epoch_and_resume_does_not_recompute(tmp_path, monkeypatch):
    model = Tiny()
    cb = HessianSensitivity(method="hawq_v1", num_batches=2, at_epoch=1, average_bits=4.0,
                            bit_choices=(2, 4, 8), ties=[["net.0", "net.5"]], eig_max_iter=20)
    t = trainer(tmp_path, cb, 2)
    t.fit(model, loader(), loader())  # epoch 1 starts after validation ran in inference mode
    assert cb.done and cb.bits["net.0"] == cb.bits["net.5"]
    ckpt = tmp_path / "c.ckpt"
    t.save_checkpoint(ckpt)

    def boom(*a, **k):
        raise AssertionError("analysis recomputed after resume")

    monkeypatch.setattr(hs_mod, "analyze", boom)
    model2 = Tiny()
    assert all(model2.get_submodule(n).weight_quantizer.bits == 8 for n in LAYERS)
    cb2 = HessianSensitivity(method="hawq_v1", num_batches=2, at_epoch=1, average_bits=4.0,
                             bit_choices=(2, 4, 8), ties=[["net.0", "net.5"]])
    trainer(tmp_path, cb2, 3).fit(model2, loader(), loader(), ckpt_path=ckpt)
    assert cb2.bits == cb.bits
    for n in LAYERS:
        assert model2.get_submodule(n).weight_quantizer.bits == cb.bits[n]


def test_callback_run_inside_inference_mode_and_frozen_layer_error(tmp_path):
    model = Tiny()
    cb = HessianSensitivity(method="qbert", num_batches=4, qbert_subsamples=2, eig_max_iter=10)
    t = trainer(tmp_path, cb, 1)
    t.fit(model, loader(), loader())
    assert sorted(set(cb.bits.values())) == [2, 3, 4]  # three layers, three tiers
    cb.done = False
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with torch.inference_mode():
        cb.run(t, model)
    assert cb.done and all(p.grad is None for p in model.parameters())
    model.net[3].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="group 'net.3' does not require grad"):
        cb.run(t, model)
    with pytest.raises(ValueError, match="needs exactly one of budget_bits or average_bits"):
        HessianSensitivity(method="hawq_v2")
