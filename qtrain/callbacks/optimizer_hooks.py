"""Optimizer plumbing shared by the staged compression callbacks (INQ, iPQ, Deep Compression,
vector quantization): rebuilding the optimizers after parameters changed, and keeping one
post-step hook on every live optimizer (masks and frozen weights re-applied after each step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


def rebuild_optimizers(trainer, continue_schedule: bool = True) -> None:
    """Fresh optimizers from the LightningModule's ``configure_optimizers`` (no momentum or
    Adam moments carried across a change of parameters) with the same parameter groups
    (:meth:`qtrain.modules.base.TaskModule.param_groups`: weights decayed, quantizer
    parameters not); with ``continue_schedule`` every LR scheduler is stepped to where the
    run is (by step or by epoch, per its ``interval``)."""
    trainer.strategy.setup_optimizers(trainer)
    if not continue_schedule:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for cfg in trainer.lr_scheduler_configs:
            done = trainer.global_step if cfg.interval == "step" else trainer.current_epoch
            for _ in range(done // max(1, cfg.frequency)):
                cfg.scheduler.step()


def hook_optimizer_steps(trainer, hooked: dict, fn: Callable[[], None]) -> None:
    """Make ``fn`` run after every step of each of ``trainer.optimizers`` exactly once:
    ``hooked`` (id(optimizer) -> handle, owned by the caller) drops the hooks of optimizers
    that were replaced and adds one to each new optimizer."""
    live = {id(o) for o in trainer.optimizers}
    for key in [k for k in hooked if k not in live]:
        hooked.pop(key).remove()
    for opt in trainer.optimizers:
        if id(opt) not in hooked:
            hooked[id(opt)] = opt.register_step_post_hook(lambda *_: fn())
