"""Loss-aware binarization (Hou, Yao & Kwok 2017, ICLR, Algorithm 1) as a Lightning callback.

Layer selection and attachment are the QAT callback's (:class:`qtrain.callbacks.qat.
QATCallback`: include/exclude regexes that must each match a layer, types, first/last policy,
overrides, the FP32 -> quantized schedule); the weight slot holds a
:class:`qtrain.nn.lab_quantizer.LABWeightQuantizer`. What LAB adds, after every optimizer step
(``on_train_batch_end``, which Lightning calls after ``optimizer.step()`` of the batch):

1. clip the float weights of the binarized layers to [-clip, clip] (paper: [-1, 1]) -- only
   once binarization is enabled, so the FP32 phase of a run is ordinary Adam training,
2. read Adam's second moment ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) of each
   binarized weight from the optimizer state, apply Adam's bias correction
   ``v_hat = v / (1 - beta2^t)`` (the paper's Algorithm 1 uses the bias-corrected v_hat) and
   store ``d = sqrt(v_hat) + eps`` (eps: the param group's, i.e. Adam's own denominator) in
   the layer's quantizer; the next forward computes alpha = ||d w||_1 / ||d||_1 from it.

``d`` is refreshed also during the FP32 phase (so the first binarized forward uses the current
Adam state) and at ``on_train_start`` (a resumed run reads the restored optimizer state).
Before the first Adam step there is no state: ``d`` stays the constant 1 (alpha = mean|W|).

Only ``torch.optim.Adam`` / ``AdamW`` (non-sharded state) are accepted: any other optimizer,
or a binarized weight that no optimizer trains, is one clear ValueError at ``on_train_start``.
Simplification: the paper also rescales with d in the update; here the update is Adam's own
(identical: Adam's step is m_hat / d), so nothing else changes in the optimizer.
"""

from __future__ import annotations

import torch

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.nn.lab_quantizer import LABWeightQuantizer

ALLOWED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def adam_curvature(state: dict, group: dict) -> torch.Tensor | None:
    """``sqrt(v_hat) + eps`` of one parameter from its Adam/AdamW ``state`` and param
    ``group``, or None before its first step (Kingma & Ba 2015 Alg. 1 with bias correction:
    exactly the denominator of Adam's step)."""
    if not state or "exp_avg_sq" not in state:
        return None
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    bias_correction2 = 1.0 - group["betas"][1] ** float(state["step"])
    return (v.detach() / bias_correction2).sqrt() + group["eps"]


class LABCallback(QATCallback):
    """Args: those of :class:`QATCallback` (``weight`` must build LABWeightQuantizer; it is
    the default) plus ``clip``: float weights are clipped to [-clip, clip] after every step
    once binarization is on (paper: 1.0; null: no clipping)."""

    def __init__(self, bits: int = 1, weight=LABWeightQuantizer, act=None,
                 clip: float | None = 1.0, **kw) -> None:
        super().__init__(bits=bits, weight=weight, act=act, **kw)
        if not isinstance(self._make(weight, bits, "quant.bits"), LABWeightQuantizer):
            raise ConfigError("quant.weight must build a LABWeightQuantizer "
                              f"(qtrain.nn.lab_quantizer), got {weight!r}")
        if clip is not None and not clip > 0:
            raise ConfigError(f"quant.clip={clip}; allowed: a positive float or null")
        self.clip = clip
        self._targets: list[tuple] = []  # (layer, weight, quantizer, optimizer, group)

    def _lab_layers(self):
        for name, m in self.layers.items():
            wq = m.weight_quantizer
            if isinstance(wq, LABWeightQuantizer):
                yield name, m.weight, wq

    def _bind_optimizers(self, trainer) -> None:
        """(layer, weight, quantizer, optimizer) for every binarized weight; checks the
        optimizer type (one clear error)."""
        owner = {}
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    owner[id(p)] = (opt, g)
        targets, missing = [], []
        for name, w, wq in self._lab_layers():
            opt, group = owner.get(id(w), (None, None))
            if opt is None:
                missing.append(name)
                continue
            if not isinstance(opt, ALLOWED_OPTIMIZERS):
                raise ConfigError(
                    f"LAB (quant: LABCallback) reads Adam's second moment, but layer {name}'s "
                    f"weight is trained by {type(opt).__module__}.{type(opt).__name__}; allowed "
                    f"optimizers: {', '.join(c.__module__ + '.' + c.__name__ for c in ALLOWED_OPTIMIZERS)}"
                    " (use optimizer=adam)")
            targets.append((name, w, wq, opt, group))
        if missing:
            raise ValueError(f"LAB: the binarized weights of {', '.join(missing)} are in no "
                             "optimizer param group; LAB needs their Adam state")
        self._targets = targets

    def _binarizing(self, trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch

    @torch.no_grad()
    def refresh(self, clip: bool) -> None:
        """Clip the float weights (if ``clip``) and store each layer's current Adam ``d``."""
        for _, w, wq, opt, group in self._targets:
            if clip and self.clip is not None:
                w.clamp_(-self.clip, self.clip)
            d = adam_curvature(opt.state.get(w), group)
            if d is not None:
                wq.set_curvature(d)

    # -- Lightning hooks (QATCallback's setup / schedule hooks are inherited) ------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._bind_optimizers(trainer)
        self.refresh(clip=False)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.start_epoch > 0 and trainer.current_epoch == self.start_epoch:
            self.refresh(clip=True)  # FP32 -> binary switch: start inside the [-clip, clip] box

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.refresh(clip=self._binarizing(trainer))
