"""GLUE-style sequence classification with a transformers model (accuracy, MCC or F1)."""

from __future__ import annotations

import torch.nn.functional as F
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassMatthewsCorrCoef,
)

from qtrain.modules.base import TaskModule

METRICS = ("acc", "mcc", "f1")


class SequenceClassifier(TaskModule):
    def __init__(self, model, num_classes: int = 2, metric: str = "acc", **kw) -> None:
        super().__init__(model, **kw)
        if metric not in METRICS:
            raise ValueError(f"task.metric={metric!r}; allowed: {METRICS}")
        if metric == "f1" and num_classes != 2:
            raise ValueError("task.metric=f1 needs a binary task (num_classes=2)")
        self.metric = metric

        def make():
            if metric == "acc":
                return MulticlassAccuracy(num_classes, average="micro")
            if metric == "mcc":
                return MulticlassMatthewsCorrCoef(num_classes)
            return BinaryF1Score()

        self.val_metric, self.test_metric = make(), make()

    def split_batch(self, batch):
        labels = batch["labels"]
        return {k: v for k, v in batch.items() if k != "labels"}, labels

    def task_loss(self, logits, y):
        return F.cross_entropy(logits, y)

    def update_metrics(self, stage, logits, y, loss) -> None:
        m = self.val_metric if stage == "val" else self.test_metric
        m(self._preds(logits), y)
        self.log(f"{stage}_{self.metric}", m, prog_bar=True)

    def _preds(self, logits):
        return logits.argmax(-1) if self.metric == "f1" else logits

    def new_eval_metric(self):
        fresh = self.val_metric.clone()  # MCC / F1: one confusion matrix over all batches
        fresh.reset()
        return fresh

    def update_eval_metric(self, metric, logits, y, loss) -> None:
        metric.update(self._preds(logits), y)
