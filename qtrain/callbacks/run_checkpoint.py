"""``ModelCheckpoint`` that saves every N epochs *and* every N training steps *and* every N
minutes (any of them may be off), keeping the newest ``save_top_k`` files plus ``last.ckpt``.

Lightning's ``ModelCheckpoint`` accepts only one of ``every_n_epochs``,
``every_n_train_steps`` and ``train_time_interval`` per instance, although its hooks already
handle all three (steps and time in ``on_train_batch_end``, epochs at the end of the epoch or
of its validation). This subclass only lifts that restriction; saving, naming, pruning and
``last.ckpt`` are Lightning's. Two saves at the same global step are one save.

The step and time triggers never save on the last batch of an epoch: Lightning 2.x resumes
such a checkpoint (saved before the epoch's validation and ``on_train_epoch_end``) by
skipping that validation, the ``on_train_epoch_end`` hooks, the epoch's LR-scheduler step
and the next epoch's ``on_train_epoch_start`` hooks, so the resumed run would diverge. The
epoch trigger saves right after (with ``every_n_epochs: 1``); otherwise the next step or
time trigger does.

``last.ckpt`` is always the newest checkpoint of the run: a file of that name already in the
folder (a run resumed from a checkpoint kept elsewhere into its old folder, or a rerun into
the same ``hydra.run.dir``) is replaced, not kept beside a new ``last-v1.ckpt`` as Lightning's
version counter would do (``ckpt_path=last`` / ``ckpt_path=<run dir>`` would then resume from
the stale file and lose the work in between). The same holds for the epoch/step files:
their names carry the global step, so a name that exists is a save of that same step.

"Keep the last K": with ``monitor="step"`` and ``mode="max"`` (the defaults here, as in
``conf/callbacks/default.yaml``) Lightning's top-k bookkeeping keeps the ``save_top_k``
newest checkpoints (``-1``: all, ``0``: only ``last.ckpt``). Files are written atomically
by :class:`qtrain.checkpointing.VerifiedCheckpointIO`.
"""

from __future__ import annotations

from datetime import timedelta

from pytorch_lightning.callbacks import ModelCheckpoint

from qtrain.errors import ConfigError


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, *, every_n_epochs: int | None = 1, every_n_train_steps: int | None = 0,
                 train_time_interval: timedelta | None = None, monitor: str | None = "step",
                 mode: str = "max", save_top_k: int = 2, save_last: bool | str | None = True,
                 **kwargs) -> None:
        steps = every_n_train_steps or 0
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps!r}; "
                              "allowed: an integer >= 0 (0 or null: off)")
        if train_time_interval is not None and (
                not isinstance(train_time_interval, timedelta)
                or train_time_interval.total_seconds() <= 0):
            raise ConfigError(
                f"callbacks.checkpoint.train_time_interval={train_time_interval!r}; allowed: a "
                "positive duration ({_target_: datetime.timedelta, minutes: 30}) or null (off)")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 0):
            raise ConfigError(f"callbacks.checkpoint.every_n_epochs={every_n_epochs!r}; "
                              "allowed: an integer >= 0 (0: off)")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(f"callbacks.checkpoint.save_top_k={save_top_k!r}; allowed: -1 (all), "
                              "0 (only last.ckpt) or the number of newest checkpoints to keep")
        # Lightning validates the epoch trigger; the step and time triggers are set after
        kwargs.setdefault("enable_version_counter", False)  # last.ckpt is the newest (above)
        super().__init__(every_n_epochs=every_n_epochs or 0, monitor=monitor, mode=mode,
                         save_top_k=save_top_k, save_last=save_last, **kwargs)
        self._every_n_train_steps = steps
        self._train_time_interval = train_time_interval

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop.batch_progress.is_last_batch or (
                epoch_loop.batch_progress.current.ready >= trainer.num_training_batches):
            return  # see the module docstring
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
