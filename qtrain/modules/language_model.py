"""Causal language modelling: next-token cross-entropy; perplexity = exp(mean token NLL).

Every perplexity this module reports (``val_ppl``, ``test_ppl`` and, through
:meth:`~qtrain.modules.base.TaskModule.eval_accumulator`, the extra passes of callbacks such
as Quant-Noise's ``val_ppl_float`` / ``val_ppl_quant``) is exp of the token-weighted mean
cross-entropy over all evaluated tokens, exp(sum of token NLLs / number of tokens), the
standard definition (fairseq's ``2 ** (loss / ntokens)`` in base 2) -- never a mean of
per-batch perplexities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from qtrain.modules.base import TaskModule

IGNORE_INDEX = -100  # F.cross_entropy's default: targets with this value are not tokens


class CausalLM(TaskModule):
    metric = "ppl"
    higher_is_better = False

    def __init__(self, model, **kw) -> None:
        super().__init__(model, **kw)
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()

    def task_loss(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def loss_weight(self, targets) -> int:
        """The number of tokens the mean NLL is over."""
        return int((targets != IGNORE_INDEX).sum())

    def update_metrics(self, stage, logits, y, loss) -> None:
        m = self.val_nll if stage == "val" else self.test_nll
        self.update_eval_metric(m, logits, y, loss)
        self.log(f"{stage}_ppl", m, on_step=False, on_epoch=True, prog_bar=True,
                 metric_attribute=f"{stage}_nll")

    def new_eval_metric(self) -> MeanMetric:
        return MeanMetric()  # token-weighted mean NLL

    def update_eval_metric(self, metric, logits, y, loss) -> None:
        metric.update(loss.detach(), weight=self.loss_weight(y))

    def eval_metric_value(self, metric) -> torch.Tensor:
        return torch.exp(metric.compute())

    def on_validation_epoch_end(self) -> None:
        self._to_ppl("val")

    def on_test_epoch_end(self) -> None:
        self._to_ppl("test")

    def _to_ppl(self, stage: str) -> None:
        m = self.val_nll if stage == "val" else self.test_nll
        if m.update_called:
            self.log(f"{stage}_ppl", self.eval_metric_value(m), prog_bar=True)
            m.reset()
