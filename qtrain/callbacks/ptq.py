"""Post-training quantization (PTQ) as a Lightning callback.

Converts layers like :class:`~qtrain.callbacks.qat.QATCallback` (same rules, first/last
policy, overrides), then, before the first evaluation, runs ``num_batches`` training
batches (no augmentation order effects: eval mode, no gradients) through the model with
every calibrating quantizer collecting statistics, and freezes their ranges (min-max,
percentile, MSE, KL (Migacz 2017; 2^(b-1) / 2^b quantized bins for signed / unsigned data)
or ACIQ (Banner 2018), see :mod:`qtrain.nn.calibrated_quantizer`). Each calibrated clip value
is the end level of the activation grid (:func:`qtrain.quant.uniform.qparams_from_clip`:
quantize(alpha) == alpha). Weights keep their own min-max per-channel ranges, on PyTorch's
observer grid (S = max|w| / (2^(b-1) - 0.5), :class:`~qtrain.nn.uniform_quantizer.UniformQuantizer`).
"""

from __future__ import annotations

import torch

from qtrain.callbacks.qat import QATCallback


def _calibrating_quantizers(model):
    return [m for m in model.modules() if hasattr(m, "calibrating") and hasattr(m, "freeze")]


class PTQCallback(QATCallback):
    def __init__(self, *args, num_batches: int = 32, **kw) -> None:
        super().__init__(*args, **kw)
        if num_batches < 1:
            raise ValueError(f"quant.num_batches={num_batches}; must be >= 1")
        self.num_batches = num_batches
        self.calibrated = False

    @torch.no_grad()
    def calibrate(self, trainer, pl_module) -> None:
        qs = _calibrating_quantizers(pl_module.model)
        if not qs:
            raise ValueError("quant: PTQ needs calibrating quantizers (e.g. CalibratedQuantizer for quant.act)")
        dm = trainer.datamodule
        loader = dm.calibration_dataloader() if hasattr(dm, "calibration_dataloader") else dm.train_dataloader()
        was_training = pl_module.training
        pl_module.eval()
        for q in qs:
            q.calibrating = True
        for i, batch in enumerate(loader):
            if i >= self.num_batches:
                break
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)  # + dm hooks
            inputs, _ = pl_module.split_batch(batch)
            pl_module(inputs)
        for q in qs:
            q.calibrating = False
            q.freeze()
        pl_module.train(was_training)
        self.calibrated = True

    def _ensure_calibrated(self, trainer, pl_module) -> None:
        if not self.calibrated:
            self.calibrate(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._ensure_calibrated(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._ensure_calibrated(trainer, pl_module)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calibrated": self.calibrated}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calibrated = state.get("calibrated", False)
