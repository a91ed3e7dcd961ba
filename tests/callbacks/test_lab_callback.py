"""LAB callback in a real Lightning Trainer: d equals the bias-corrected sqrt(exp_avg_sq) + eps
read from the optimizer after every step, weights clipped to [-1, 1] once binarized, clear
errors for a non-Adam optimizer and for a layer rule that matches nothing."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.callbacks.lab import LABCallback
from qtrain.nn.convert import LayerSelectionError
from qtrain.nn.lab_quantizer import LABWeightQuantizer
from tests.callbacks.tiny_lightning import image_loader, trainer

BETA2, EPS = 0.999, 1e-8  # torch.optim.Adam defaults, used by TinyCNN(optim="adam")


class Recorder(pl.Callback):
    """Runs after LABCallback: recomputes d and alpha from the optimizer state itself."""

    def __init__(self):
        self.rows = []  # (epoch, step, max |d - ref|, max |w|, alpha err)
        self.first_batch = None

    def _lab(self, pl_module):
        return [m for m in pl_module.modules()
                if isinstance(getattr(m, "weight_quantizer", None), LABWeightQuantizer)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:  # before any Adam step: d = 1, alpha = mean|w|
            m = self._lab(pl_module)[0]
            w = m.weight.detach()
            self.first_batch = (m.weight_quantizer.d.dim(),
                                (m.weight_quantizer.alpha(w) - w.abs().mean()).abs().item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        for m in self._lab(pl_module):
            st = opt.state[m.weight]
            step = int(st["step"])
            ref = (st["exp_avg_sq"] / (1 - BETA2**step)).sqrt() + EPS
            q = m.weight_quantizer
            w = m.weight.detach()
            alpha = (ref * w.abs()).sum() / ref.sum()
            w_hat = torch.where(w >= 0, alpha, -alpha)
            self.rows.append((trainer.current_epoch, step, (q.d - ref).abs().max().item(),
                              w.abs().max().item(), (q.quantize(w) - w_hat).abs().max().item(),
                              (ref.max() / ref.min()).item()))


class Task(pl.LightningModule):
    """The project's task-module shape (the network under ``.model``, as QATCallback expects)."""

    def __init__(self, optim=torch.optim.Adam):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * 4 * 4, 4))
        self.optim, self.metric = optim, "acc"

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.optim(self.parameters(), lr=0.05)


def _model():
    model = Task()
    with torch.no_grad():
        model.model[2].weight[:, :2] = 3.0  # outside [-1, 1]: clipping must bring them back
    return model


def test_curvature_from_real_adam_state_and_clipping():
    model = _model()
    rec = Recorder()
    cb = LABCallback(first_last="quantize", start_epoch=1)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, image_loader(n=32, batch=8))
    assert set(cb.layers) == {"0", "2", "5"}
    assert rec.first_batch == (0, pytest.approx(0.0, abs=1e-7))
    assert len(rec.rows) == 3 * 8  # 3 layers x 2 epochs x 4 steps
    steps = sorted({r[1] for r in rec.rows})
    assert steps == list(range(1, 9))  # d read after every one of the 8 steps
    for epoch, step, d_err, _, a_err, d_spread in rec.rows:
        assert d_err <= 1e-6 * (1 + step), (epoch, step)
        assert a_err <= 1e-6
        assert d_spread > 2  # d really varies (not a constant that hides a wrong alpha)
    fp32 = [r[3] for r in rec.rows if r[0] == 0]
    binary = [r[3] for r in rec.rows if r[0] == 1]
    assert max(fp32) > 1.5  # FP32 phase: plain Adam, no clipping
    assert max(binary) <= 1.0 and max(binary) == pytest.approx(1.0)  # clipped to the box
    assert model.model[2].weight.abs().max().item() <= 1.0


def test_wrong_optimizer_is_one_clear_error():
    model = Task(optim=torch.optim.SGD)
    cb = LABCallback(first_last="quantize")
    with pytest.raises(ValueError, match=r"torch\.optim\.sgd\.SGD.*allowed.*Adam.*AdamW"):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, image_loader())


def test_rule_matching_nothing_is_an_error():
    cb = LABCallback(include=["encoder\\..*"], first_last="quantize")
    with pytest.raises(LayerSelectionError, match="encoder"):
        cb.convert(Task().model)


def test_weight_factory_must_be_lab():
    with pytest.raises(ValueError, match="LABWeightQuantizer"):
        LABCallback(weight=lambda bits: torch.nn.Identity())
