"""LossScaleMonitor with a real torch.amp.GradScaler on CPU: an injected inf gradient skips the
step (weights unchanged), halves the scale and is counted; Lightning's FP16 MixedPrecision
plugin end to end; double scaling refused; collapse warning; state_dict."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch import nn

from qtrain.callbacks.loss_scale_monitor import LossScaleMonitor


def manual_step(model, opt, scaler, mon, inject_inf):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    scaler.scale(model(x).pow(2).sum()).backward()
    if inject_inf:
        model.weight.grad[0, 0] = float("inf")
    mon.before_step(scaler)
    scaler.step(opt)
    scaler.update()
    return mon.after_step(scaler)


def test_injected_inf_skips_step_and_halves_scale():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    mon = LossScaleMonitor(scaler=scaler)
    w0 = model.weight.detach().clone()
    assert manual_step(model, opt, scaler, mon, False) is False  # clean step: weights move
    w1 = model.weight.detach().clone()
    assert not torch.equal(w1, w0) and scaler.get_scale() == 2.0**16
    assert manual_step(model, opt, scaler, mon, True) is True  # overflow: skipped, scale halves
    assert torch.equal(model.weight.detach(), w1) and scaler.get_scale() == 2.0**15
    assert manual_step(model, opt, scaler, mon, False) is False
    assert manual_step(model, opt, scaler, mon, False) is False  # 2 clean steps: growth x2
    assert scaler.get_scale() == 2.0**16
    assert (mon.steps, mon.skipped_steps, mon.last_scale, mon.lowest_scale) == (4, 1, 2.0**16, 2.0**15)
    state = mon.state_dict()
    mon2 = LossScaleMonitor()
    mon2.load_state_dict(state)
    assert mon2.state_dict() == state == {"steps": 4, "skipped_steps": 1, "last_scale": 2.0**16,
                                          "lowest_scale": 2.0**15, "collapsed": False}


def test_collapse_warning_once():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    mon = LossScaleMonitor(min_scale=1.5, scaler=scaler)
    manual_step(model, opt, scaler, mon, True)  # 4 -> 2: still above
    with pytest.warns(UserWarning, match="collapsed to 1"):
        manual_step(model, opt, scaler, mon, True)  # 2 -> 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manual_step(model, opt, scaler, mon, True)  # 1 -> 0.5: same collapse, no second warning
    assert mon.skipped_steps == 3 and mon.collapsed


class Tiny(pl.LightningModule):
    def __init__(self, inf_at=(), own_scaler=None):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.inf_at, self.weights, self.dtypes = set(inf_at), [], []
        if own_scaler is not None:
            self.scaler = own_scaler

    def training_step(self, batch, i):
        out = self.lin(batch[0])
        self.dtypes.append(out.dtype)
        return out.float().pow(2).mean()

    def on_after_backward(self):
        if self.global_step in self.inf_at:
            self.lin.weight.grad[0, 0] = float("inf")

    def on_train_batch_end(self, *a):
        self.weights.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, mon, steps=4):
    ds = torch.utils.data.TensorDataset(torch.randn(16, 3))
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    tr = pl.Trainer(accelerator="cpu", max_steps=steps, plugins=[plugin], callbacks=[mon],
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    tr.fit(module, torch.utils.data.DataLoader(ds, batch_size=4))
    return tr, plugin


def test_lightning_fp16_plugin_overflow_step_skipped():
    torch.manual_seed(0)
    module, mon = Tiny(inf_at={2}), LossScaleMonitor()
    tr, plugin = fit(module, mon)
    assert mon.scaler is plugin.scaler
    assert module.dtypes[0] == torch.float16  # real FP16 autocast
    assert (mon.steps, mon.skipped_steps) == (4, 1)
    assert plugin.scaler.get_scale() == 2.0**9
    w = module.weights
    assert torch.equal(w[2], w[1]) and not torch.equal(w[1], w[0]) and not torch.equal(w[3], w[2])
    assert tr.callback_metrics["loss_scale"].item() == 2.0**9
    assert tr.callback_metrics["skipped_steps"].item() == 1.0


def test_double_scaling_refused():
    with pytest.raises(ValueError, match="scaled twice"):
        fit(Tiny(own_scaler=torch.amp.GradScaler("cpu")), LossScaleMonitor())
    with pytest.raises(ValueError, match="scaled twice"):
        fit(Tiny(), LossScaleMonitor(scaler=torch.amp.GradScaler("cpu")))
    with pytest.raises(ValueError, match="min_scale"):
        LossScaleMonitor(min_scale=0)


def test_no_scaler_is_a_no_op():
    module, mon = Tiny(), LossScaleMonitor()
    tr = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[mon], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    tr.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4))
    assert mon.scaler is None and mon.steps == 0 and "loss_scale" not in tr.callback_metrics
