"""Polino et al. 2018 differentiable quantization: keep the learned points sorted.

The quantization points of :class:`qtrain.nn.polino_quantizer.PolinoDifferentiableQuantizer`
(shared by the tensor's buckets, in [0, 1]) are trained by gradient descent (d loss / d p_j =
sum of alpha_b times the gradients of the weights assigned to p_j; Polino 2018 sec. 2.2,
Algorithm 2) and re-sorted after each optimizer step. This
callback does the re-sort in ``on_train_batch_end`` (after Lightning's optimizer step) and
applies the same permutation to the optimizer's per-parameter state tensors of that shape
(SGD momentum, Adam moments), so a point keeps its own momentum after re-sorting (the
authors' code sorts only the points; keeping each point's momentum with it is our choice). The
quantized weights do not change under the permutation (each weight maps to its nearest point).
Combine with a QATCallback whose weight factory is PolinoDifferentiableQuantizer and a
DistillationCallback(loss='polino').
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from qtrain.errors import ConfigError
from qtrain.nn.polino_quantizer import PolinoDifferentiableQuantizer


class PolinoResortCallback(pl.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.num_quantizers = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        qs = [m for m in pl_module.modules() if isinstance(m, PolinoDifferentiableQuantizer)]
        if stage == "fit" and not qs:
            raise ConfigError("PolinoResortCallback: the model has no PolinoDifferentiableQuantizer "
                             "(set the QAT weight quantizer to it, and list the QAT callback first)")
        self.num_quantizers = len(qs)

    @staticmethod
    @torch.no_grad()
    def resort(pl_module, optimizers=()) -> int:
        """Sort every quantizer's points (and the matching optimizer state); returns how many
        point sets were out of order."""
        changed = 0
        for q in pl_module.modules():
            if not isinstance(q, PolinoDifferentiableQuantizer):
                continue
            p = q.points
            perm = p.argsort()
            if bool((perm == torch.arange(p.numel(), device=p.device)).all()):
                continue
            changed += 1
            p.copy_(p[perm])
            for opt in optimizers:
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.copy_(v[perm])
        return changed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.resort(pl_module, trainer.optimizers)
