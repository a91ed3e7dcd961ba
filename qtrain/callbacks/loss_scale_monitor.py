"""Dynamic loss scaling monitor for mixed-precision training (Micikevicius et al. 2018,
"Mixed Precision Training", ICLR, sec. 3.3).

Mixed precision itself is Lightning's: ``Trainer(precision='16-mixed')`` (FP16 autocast, FP32
master weights, and a ``torch.amp.GradScaler`` owned by the MixedPrecision plugin:
scale starts at 2^16, a step whose unscaled gradients hold inf/NaN is skipped and the scale
halves, after 2000 clean steps it doubles) or ``'bf16-mixed'`` (no scaler needed). This
callback never scales, unscales or steps anything: it only *reads* the plugin's scaler.

* logs ``loss_scale`` and ``skipped_steps`` every optimizer step;
* counts skipped (overflow) steps: with GradScaler's backoff factor < 1, the scale decreases
  after a step exactly when that step was skipped (inf/NaN found);
* warns (once per collapse) when the scale falls below ``min_scale`` -- gradients are then
  overflowing in FP16 even unscaled, usually a diverging run or an FP16-unsafe op;
* refuses double scaling: if the plugin owns a GradScaler and another GradScaler is given
  to this callback or held by the LightningModule (a hand-written scaler), ``setup`` raises.

Without Lightning's plugin (manual optimisation, tests) pass ``scaler=`` and call
:meth:`before_step` / :meth:`after_step` around ``scaler.step``/``scaler.update``.
The scaler's own state is checkpointed by Lightning's precision plugin; this callback's
counters by :meth:`state_dict`.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from qtrain.errors import ConfigError

log = logging.getLogger(__name__)


def plugin_scaler(trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of the trainer's precision plugin, if it has one ('16-mixed')."""
    plugin = getattr(trainer, "precision_plugin", None) or getattr(trainer.strategy, "precision_plugin", None)
    s = getattr(plugin, "scaler", None)
    return s if isinstance(s, torch.amp.GradScaler) else None


def module_scalers(pl_module) -> list[torch.amp.GradScaler]:
    return [v for v in vars(pl_module).values() if isinstance(v, torch.amp.GradScaler)]


class LossScaleMonitor(pl.Callback):
    """Args:
        min_scale: warn when the loss scale drops below this value.
        scaler: a GradScaler to monitor when Lightning's plugin has none (manual use).
    """

    def __init__(self, min_scale: float = 1.0, scaler: torch.amp.GradScaler | None = None) -> None:
        super().__init__()
        if not min_scale > 0:
            raise ConfigError(f"LossScaleMonitor: min_scale={min_scale}; must be > 0")
        self.min_scale, self.user_scaler = float(min_scale), scaler
        self.scaler: torch.amp.GradScaler | None = scaler
        self.steps = 0
        self.skipped_steps = 0
        self.last_scale: float | None = None
        self.lowest_scale: float | None = None
        self.collapsed = False
        self._pending: float | None = None

    # -- accounting (no Lightning needed) --------------------------------------------------
    def before_step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Record the scale the coming optimizer step was computed with."""
        s = scaler or self.scaler
        if s is not None and s.is_enabled():
            self._pending = s.get_scale()

    def after_step(self, scaler: torch.amp.GradScaler | None = None) -> bool | None:
        """After ``scaler.update()``: count the step; True when it was skipped (overflow)."""
        s = scaler or self.scaler
        if s is None or self._pending is None:
            return None
        new, old = s.get_scale(), self._pending
        self._pending = None
        skipped = new < old
        self.steps += 1
        self.skipped_steps += int(skipped)
        self.last_scale = new
        self.lowest_scale = new if self.lowest_scale is None else min(self.lowest_scale, new)
        if new < self.min_scale and not self.collapsed:
            self.collapsed = True
            rank_zero_warn(
                f"LossScaleMonitor: loss scale collapsed to {new:g} (< min_scale={self.min_scale:g}) "
                f"after {self.skipped_steps} skipped of {self.steps} steps: FP16 gradients overflow "
                "even unscaled (diverging run or an FP16-unsafe op; try bf16-mixed)")
        elif new >= self.min_scale:
            self.collapsed = False
        return skipped

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        owned = plugin_scaler(trainer)
        others = [s for s in module_scalers(pl_module) + [self.user_scaler]
                  if s is not None and s is not owned]
        if owned is not None and others:
            raise ConfigError(
                f"LossScaleMonitor: trainer precision={trainer.precision!r} already owns a "
                "GradScaler, and another GradScaler is in use (LossScaleMonitor(scaler=...) or an "
                "attribute of the LightningModule): the loss would be scaled twice. Remove the "
                "hand-written scaler; Lightning's plugin does the scaling.")
        self.scaler = owned or self.user_scaler
        if self.scaler is None and stage == "fit":
            log.info("LossScaleMonitor: precision=%s has no GradScaler; nothing to monitor",
                     trainer.precision)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.after_step() is None:
            return
        pl_module.log("loss_scale", self.last_scale, on_step=True, on_epoch=False)
        pl_module.log("skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps,
                "last_scale": self.last_scale, "lowest_scale": self.lowest_scale,
                "collapsed": self.collapsed}

    def load_state_dict(self, state: dict) -> None:
        for k in ("steps", "skipped_steps", "last_scale", "lowest_scale", "collapsed"):
            setattr(self, k, state[k])
