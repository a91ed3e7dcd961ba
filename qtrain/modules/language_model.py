"""Causal language modelling: next-token cross-entropy; perplexity = exp(mean token NLL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from qtrain.modules.base import TaskModule


class CausalLM(TaskModule):
    metric = "ppl"
    higher_is_better = False

    def __init__(self, model, **kw) -> None:
        super().__init__(model, **kw)
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()

    def task_loss(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def batch_metric(self, logits, y, loss):
        return torch.exp(loss)

    def update_metrics(self, stage, logits, y, loss) -> None:
        m = self.val_nll if stage == "val" else self.test_nll
        m.update(loss.detach(), weight=y.numel())
        self.log(f"{stage}_ppl", m, on_step=False, on_epoch=True, prog_bar=True,
                 metric_attribute=f"{stage}_nll")

    def on_validation_epoch_end(self) -> None:
        self._to_ppl("val")

    def on_test_epoch_end(self) -> None:
        self._to_ppl("test")

    def _to_ppl(self, stage: str) -> None:
        m = self.val_nll if stage == "val" else self.test_nll
        if m.update_called:
            self.log(f"{stage}_ppl", torch.exp(m.compute()), prog_bar=True)
            m.reset()
