"""conf/scheduler/linear_warmup.yaml: num_training_steps null = the run's length, so the LR
decays to 0 exactly at the end of a real Trainer run (it was hard-coded to 10000)."""

import functools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.errors import ConfigError
from qtrain.modules.classification import ImageClassifier

CONF = Path(__file__).resolve().parents[2] / "conf" / "scheduler" / "linear_warmup.yaml"
LR, WARMUP = 0.1, 3


class _LRs(pl.Callback):
    """The LR each optimizer step uses, and the scheduler's LR after the run."""

    def __init__(self):
        self.used = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.used.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module):
        self.final = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]


def _fit(interval="step", **trainer_kw):
    cfg = OmegaConf.load(CONF)
    cfg.num_warmup_steps = WARMUP
    sched = instantiate(cfg)  # the real config file, a functools.partial
    assert sched.keywords["num_training_steps"] is None
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    module = ImageClassifier(nn.Sequential(nn.Linear(4, 3)), num_classes=3,
                             optimizer=functools.partial(torch.optim.SGD, lr=LR),
                             scheduler=sched, scheduler_interval=interval)
    rec = _LRs()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[rec], accelerator="cpu",
                         **trainer_kw)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return rec


def test_lr_decays_to_zero_at_the_last_optimizer_step():
    rec = _fit(max_epochs=2)  # 5 batches per epoch -> 10 optimizer steps
    total = 10
    # transformers' formula worked by hand: t / W during warmup, (T - t) / (T - W) after
    expected = [LR * (t / WARMUP if t < WARMUP else (total - t) / (total - WARMUP))
                for t in range(total)]
    assert rec.used == pytest.approx(expected)
    assert rec.used[-1] == pytest.approx(LR / (total - WARMUP))  # last step: one slice left
    assert rec.final == 0.0  # stepped once more after the last step: 0


def test_length_follows_accumulation_and_limits():
    # 4 batches per epoch (limit), accumulate 2 -> 2 optimizer steps per epoch, 3 epochs = 6
    rec = _fit(max_epochs=3, limit_train_batches=4, accumulate_grad_batches=2)
    assert rec.final == 0.0
    assert min(rec.used[WARMUP * 2:]) > 0  # not 0 before the end


def test_epoch_interval_counts_epochs():
    rec = _fit(interval="epoch", max_epochs=5)
    per_epoch = rec.used[::5]  # the LR of the first batch of each epoch
    assert per_epoch == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR, LR / 2])
    assert rec.final == 0.0


def test_unbounded_run_needs_an_explicit_length():
    with pytest.raises(ConfigError, match=r"num_training_steps.*max_epochs=-1.*max_steps=-1"):
        _fit(max_epochs=-1, max_steps=-1)
