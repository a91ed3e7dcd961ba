"""Common LightningModule plumbing for every task.

* optimizer / scheduler come from config as ``_partial_`` callables (``torch.optim.SGD`` with
  lr etc. bound), applied to the trainable parameters that exist when Lightning calls
  ``configure_optimizers`` (callbacks that add quantizer parameters do so in ``setup``, which
  runs first; callbacks that swap layers mid-run rebuild the optimizer via
  ``trainer.strategy.setup_optimizers``).
* two parameter groups (:meth:`TaskModule.param_groups`): the network's weights with the
  optimizer's ``weight_decay``, and every learned quantizer parameter (PACT alpha, LSQ step
  sizes, DSQ alpha / bounds, TTQ scales, Polino points, soft-to-hard centres: the parameters
  owned by a :class:`~qtrain.nn.quantizer_base.Quantizer` module, found structurally) with
  ``weight_decay=0``. Weight decay would pull clip values and scales towards 0, which none of
  these papers does; PACT's own L2 on alpha (``regularization()``) still applies. Callbacks that
  rebuild the optimizer go through ``configure_optimizers`` and keep the same groups.
* ``regularization()``: the sum of ``regularization()`` of every submodule that has one
  (e.g. PACT's L2 on alpha) is added to the training loss.
* ``loss_hook``: an optional callable ``(module, batch, outputs, loss) -> loss`` installed by a
  callback (distillation) to change the training objective without subclassing.
* metric keys: ``train_loss``, ``val_loss``, ``val_<metric>``, ``test_<metric>``.
* :meth:`TaskModule.eval_accumulator`: the same ``loss`` and ``<metric>`` over the batches a
  callback evaluates itself (Quant-Noise's float / fully quantized passes), aggregated over
  all of them as the trainer's own validation does: the loss is the mean over all evaluated
  items (samples; tokens for LMs, so perplexity = exp of the token-weighted mean NLL), the
  metric a torchmetrics state over all batches -- never a mean of per-batch values, which
  weights a short last batch like a full one and, for perplexity, averages exp(batch NLL)
  (Jensen: above exp of the mean). Under DDP ``compute()`` reduces over all ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer


class TaskModule(pl.LightningModule):
    metric: str = "acc"
    higher_is_better: bool = True

    def __init__(
        self, model: nn.Module, optimizer: Callable | None = None,
        scheduler: Callable | None = None, scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}; allowed: epoch, step")
        self.scheduler_interval = scheduler_interval
        self.loss_hook: Callable | None = None

    def forward(self, x):
        return self.model(x)

    # -- objective ---------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | float:
        total = 0.0
        for m in self.model.modules():
            reg = getattr(m, "regularization", None)
            if callable(reg) and m is not self:
                total = total + reg()
        return total

    def split_batch(self, batch):
        return batch[0], batch[1]

    def task_loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        inputs, targets = self.split_batch(batch)
        outputs = self(inputs)
        loss = self.task_loss(outputs, targets)
        if self.loss_hook is not None:
            loss = self.loss_hook(self, batch, outputs, loss)
        loss = loss + self.regularization()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str):
        inputs, targets = self.split_batch(batch)
        outputs = self(inputs)
        loss = self.task_loss(outputs, targets)
        # sync_dist: under DDP every rank logs (and checkpoints / early-stops on) the mean over
        # all ranks' batches, not its own shard's; reduced once at epoch end (on_epoch only)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.update_metrics(stage, outputs, targets, loss)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def update_metrics(self, stage, outputs, targets, loss) -> None:
        raise NotImplementedError

    # -- extra evaluations (callbacks: Quant-Noise's float vs quantized passes) -------------
    def new_eval_metric(self) -> Metric:
        """A fresh metric state of this task's kind, aggregated over every evaluated batch
        as ``val_<metric>`` is (not a mean of per-batch values)."""
        raise NotImplementedError

    def update_eval_metric(self, metric: Metric, outputs, targets, loss) -> None:
        raise NotImplementedError

    def eval_metric_value(self, metric: Metric) -> torch.Tensor:
        return metric.compute()

    def loss_weight(self, targets) -> int:
        """How many items ``task_loss`` (a mean) is over: samples, or tokens for LMs."""
        return int(targets.numel())

    def eval_accumulator(self) -> EvalAccumulator:
        """{'loss', <metric>} of this module over many batches, see :class:`EvalAccumulator`."""
        return EvalAccumulator(self)

    # -- optimisation -------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """[{'params': weights}, {'params': quantizer parameters, 'weight_decay': 0.0}] over
        the trainable parameters (empty groups left out). A parameter is a quantizer
        parameter when a :class:`Quantizer` module registers it (its own or a submodule's),
        whatever its name; a parameter shared with a non-quantizer module stays decayed."""
        inside = {id(m) for q in self.modules() if isinstance(q, Quantizer) for m in q.modules()}
        quant_ids = {id(p) for m in self.modules() if id(m) in inside
                     for p in m.parameters(recurse=False)}
        quant_ids -= {id(p) for m in self.modules() if id(m) not in inside
                      for p in m.parameters(recurse=False)}
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if id(p) not in quant_ids]
        no_decay = [p for p in params if id(p) in quant_ids]
        groups = [{"params": decay}] if decay else []
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("optimizer is not configured (set optimizer=sgd|adam|adamw)")
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": self._build_scheduler(opt), "interval": self.scheduler_interval}}

    def _build_scheduler(self, opt):
        """The scheduler from its ``_partial_`` factory. A factory with
        ``num_training_steps=None`` (``conf/scheduler/linear_warmup.yaml``) gets the run's
        length in scheduler steps: ``trainer.estimated_stepping_batches`` (optimizer steps,
        after ``max_steps``/``max_epochs``, ``limit_train_batches`` and gradient
        accumulation) for ``scheduler_interval='step'``, ``trainer.max_epochs`` for 'epoch'."""
        factory = self.scheduler_factory
        if (getattr(factory, "keywords", None) or {}).get("num_training_steps", 0) is None:
            factory = functools.partial(factory, num_training_steps=self._scheduler_steps())
        return factory(opt)

    def _scheduler_steps(self) -> int:
        t = self.trainer
        n = t.estimated_stepping_batches if self.scheduler_interval == "step" else t.max_epochs
        if n is None or not math.isfinite(n) or n < 1:
            raise ConfigError(
                f"scheduler.num_training_steps is null, so it is taken from the run's length, "
                f"but this run has none in {self.scheduler_interval}s (max_epochs="
                f"{t.max_epochs}, max_steps={t.max_steps}); set trainer.max_epochs / "
                f"trainer.max_steps or scheduler.num_training_steps")
        return int(n)


class EvalAccumulator:
    """``loss`` and ``module.metric`` of a :class:`TaskModule` over many batches:
    ``update(batch)`` runs the module (no grad) and adds the batch; ``compute()`` returns
    ``{'loss': mean over all evaluated items, <metric>: value over all batches}`` (reduced
    over DDP ranks by torchmetrics)."""

    def __init__(self, module: TaskModule) -> None:
        self.module = module
        self.loss = MeanMetric().to(module.device)
        self.metric = module.new_eval_metric().to(module.device)

    @torch.no_grad()
    def update(self, batch) -> None:
        m = self.module
        inputs, targets = m.split_batch(batch)
        outputs = m(inputs)
        loss = m.task_loss(outputs, targets)
        self.loss.update(loss.detach(), weight=m.loss_weight(targets))
        m.update_eval_metric(self.metric, outputs, targets, loss.detach())

    def compute(self) -> dict:
        return {"loss": self.loss.compute(), self.module.metric:
                self.module.eval_metric_value(self.metric)}
