"""Image classification (cross-entropy, top-1 accuracy via torchmetrics)."""

from __future__ import annotations

import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from qtrain.modules.base import TaskModule


class ImageClassifier(TaskModule):
    metric = "acc"

    def __init__(self, model, num_classes: int = 10, label_smoothing: float = 0.0, **kw) -> None:
        super().__init__(model, **kw)
        self.label_smoothing = label_smoothing
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def task_loss(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if self.training else 0.0)

    def update_metrics(self, stage, logits, y, loss) -> None:
        m = self.val_acc if stage == "val" else self.test_acc
        m(logits, y)
        self.log(f"{stage}_acc", m, prog_bar=True)

    def new_eval_metric(self):
        fresh = self.val_acc.clone()
        fresh.reset()
        return fresh

    def update_eval_metric(self, metric, logits, y, loss) -> None:
        metric.update(logits, y)
