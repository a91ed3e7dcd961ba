"""The QAT callback's integer-only options in a real Lightning Trainer: BN statistics move until
``bn_freeze_step`` and stay fixed after it (TF ``freeze_batch_norm_delay``), and bad settings
fail at construction naming the key."""

import functools

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.models.small import SmallCNN
from qtrain.nn.bn_fold import FoldedConvBN
from qtrain.nn.uniform_quantizer import UniformQuantizer

W = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="minmax")
A = functools.partial(UniformQuantizer, symmetric=False, granularity="tensor", observer="ema")


class _Module(pl.LightningModule):
    metric = "acc"

    def __init__(self):
        super().__init__()
        self.model = SmallCNN(tiny=True)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _Stats(pl.Callback):
    def __init__(self):
        self.means, self.frozen = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        folded = pl_module.model.features[0]
        self.means.append(folded.bn.running_mean.clone())
        self.frozen.append(bool(folded.bn_frozen))


def test_bn_freeze_step_in_a_real_trainer():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,)))
    cb = QATCallback(bits=8, weight=W, act=A, first_last="quantize", fold_bn=True, bn_freeze_step=3)
    stats = _Stats()
    trainer = pl.Trainer(max_steps=6, callbacks=[cb, stats], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    module = _Module()
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert isinstance(module.model.features[0], FoldedConvBN)
    assert isinstance(module.model.features[1], torch.nn.Identity)  # the BN lives in the fold
    assert stats.frozen == [False, False, False, True, True, True]
    moved = [not torch.equal(a, b) for a, b in zip(stats.means, stats.means[1:])]
    assert moved == [True, True, False, False, False]  # batches 1, 2 update; 3.. frozen


def test_bad_intqat_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="quant.bn_freeze_step"):
        QATCallback(weight=W, act=A, fold_bn=False, bn_freeze_step=10)
    with pytest.raises(ConfigError, match="quant.quantize_residual"):
        QATCallback(weight=W, act=None, quantize_residual=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="fold_bn=true: the model has no"):
        QATCallback(weight=W, act=A, fold_bn=True, first_last="quantize").convert(model)
