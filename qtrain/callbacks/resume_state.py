"""What Lightning leaves out of a checkpoint but a bitwise resume needs: every global
random-number state and the logged metrics callbacks read.

RNG states (``checkpoint["rng_states"]``, written by :meth:`ResumeState.on_save_checkpoint`): the
CPU torch generator, every CUDA generator (when CUDA is present), numpy's global RNG and
Python's ``random``, collected by Lightning's own ``_collect_rng_states``. numpy's state is
stored as a tensor so the checkpoint stays loadable with ``torch.load(weights_only=True)``.

Logged metrics (``checkpoint["callback_metrics"]``): ``trainer.callback_metrics`` at the
save. Method callbacks read them (e.g. the FP32 validation metric when quantization starts
at the next epoch); a resumed run has none until it validates again.

Both are restored at the end of ``on_train_start`` (this callback runs after the method callbacks),
not when the checkpoint is read: between reading the checkpoint and that point a resumed run
repeats set-up work that the uninterrupted run did before the checkpoint (callback set-up,
``on_train_start`` hooks, building the data iterators), and any random numbers drawn there
must not shift the stream. From ``on_train_start`` on, a resumed run executes the same hooks
as the uninterrupted one did after the save: Lightning 2.x skips ``on_train_epoch_start`` on a
mid-epoch restart and replays only ``on_train_epoch_end`` on an end-of-epoch one.

Data order and augmentation randomness do not come from these states (see
:mod:`qtrain.data.resumable`): worker processes restart on resume, so each sample is loaded
with RNGs seeded from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

KEY = "rng_states"
METRICS_KEY = "callback_metrics"


def collect() -> dict[str, Any]:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    name, keys, pos, has_gauss, gauss = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                       int(has_gauss), float(gauss))
    return states


def restore(states: dict[str, Any]) -> None:
    """Set the global RNG states saved by :func:`collect`."""
    states = dict(states)
    if "numpy" in states:
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                           has_gauss, gauss)
    if not torch.cuda.is_available():
        states.pop("torch.cuda", None)
    elif not states.get("torch.cuda"):  # saved without CUDA: leave the CUDA generators alone
        states.pop("torch.cuda", None)
    _set_rng_states(states)


class ResumeState(pl.Callback):
    """Save all global RNG states and the logged metrics with every checkpoint; restore
    them on resume (see the module docstring for when). ``qtrain.run`` adds it to every
    run, after the method callbacks."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = collect()
        checkpoint[METRICS_KEY] = {
            k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            for k, v in trainer.callback_metrics.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = {"rng": checkpoint.get(KEY), "metrics": checkpoint.get(METRICS_KEY)}

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        if self._pending["metrics"]:
            for k, v in self._pending["metrics"].items():
                trainer.callback_metrics[k] = v
        if self._pending["rng"] is not None:
            restore(self._pending["rng"])
        self._pending = None
