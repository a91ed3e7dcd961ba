"""Stopping a run on a signal without losing it: a checkpoint, a marker, an honest exit status.

- ``SIGTERM`` (how SLURM and most schedulers preempt a job) and ``SIGUSR1``: the run stops at
  the next batch boundary, saves ``checkpoints/last.ckpt`` and leaves ``PREEMPTED``; exit
  status 128 + signal number (143 for SIGTERM, 138 for SIGUSR1).
- ``SIGINT`` (Ctrl-C): the same stop and checkpoint, marker ``INTERRUPTED``, exit status 130.
  A second Ctrl-C stops at once (no checkpoint).
- Under SLURM (Lightning's ``SLURMEnvironment`` detected) ``SIGUSR1`` is left to Lightning,
  which saves an ``hpc_ckpt_<n>.ckpt`` in the run dir and requeues the job
  (``scontrol requeue``); the ``SIGTERM`` that follows is handled as above.

Inside ``trainer.fit`` this builds on Lightning 2.x: its SIGTERM handler sets
``trainer.received_sigterm`` and the loops raise ``SIGTERMException`` after the current batch
(a consistent state to save); SIGUSR1 and SIGINT are forwarded to that handler.
:class:`SignalCheckpoint` writes the checkpoint from ``on_exception``. Outside the trainer's
loops (data preparation, model build, callback setup, checkpoint restore) there is no
consistent training state to save: the signal raises :class:`RunStopped` at once.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("qtrain")

#: marker file written into the run directory for each stopping signal
MARKERS = {signal.SIGTERM: "PREEMPTED", signal.SIGUSR1: "PREEMPTED", signal.SIGINT: "INTERRUPTED"}


class RunStopped(BaseException):
    """A stopping signal received outside the trainer's loops (nothing consistent to save).

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception`` in library
    code cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


@dataclass
class _State:
    signum: int | None = None  # the first stopping signal received
    checkpoint: str | None = None  # where SignalCheckpoint saved the run, if it did
    epoch: int | None = None
    step: int | None = None


_state = _State()


def received() -> int | None:
    """The first stopping signal received by this process (None: none)."""
    return _state.signum


def saved_checkpoint() -> tuple[str | None, int | None, int | None]:
    """(path, epoch, global step) of the checkpoint saved on the signal, or Nones."""
    return _state.checkpoint, _state.epoch, _state.step


def _lightning_handles_sigterm() -> bool:
    return signal.getsignal(signal.SIGTERM) is not _handler


def _handler(signum, frame) -> None:
    first = _state.signum is None
    if first:
        _state.signum = signum
        log.warning("%s received: stopping (checkpoint at the next batch boundary when "
                    "training)", signal.Signals(signum).name)
    elif signum == signal.SIGINT and _state.signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: stop now
    if _lightning_handles_sigterm():
        # inside a trainer loop: Lightning's SIGTERM handler (which calls this one for SIGTERM)
        # flags the trainer; its loops raise SIGTERMException after the current batch
        if signum != signal.SIGTERM and first:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)
        return
    if first:
        raise RunStopped(signum)


@contextmanager
def handling():
    """Install the handlers for the duration of a run (main thread only); restore after."""
    sigs = [signal.SIGTERM, signal.SIGINT]
    if not SLURMEnvironment.detect():  # under SLURM, Lightning's requeue handler takes SIGUSR1
        sigs.append(signal.SIGUSR1)
    _state.__init__()
    old = {s: signal.signal(s, _handler) for s in sigs}
    try:
        yield _state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def is_stop(e: BaseException) -> bool:
    """Whether ``e`` ends the run because of a stopping signal (as opposed to an error)."""
    if isinstance(e, RunStopped | SIGTERMException | KeyboardInterrupt):
        return True
    # Lightning turns a KeyboardInterrupt into sys.exit(1) after its on_exception hooks
    return isinstance(e, SystemExit) and _state.signum is not None


def outcome(e: BaseException) -> tuple[str, int, str]:
    """(marker file name, exit status, message) for the signal that stopped the run."""
    signum = _state.signum
    if signum is None:
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
    name = signal.Signals(signum).name
    path, epoch, step = saved_checkpoint()
    if path:
        where = f"checkpoint saved at epoch {epoch}, global step {step}: {path}"
    else:
        where = ("no checkpoint saved by the signal (it came outside trainer.fit, or a second "
                 "Ctrl-C); checkpoints/ holds the last one written during training, if any")
    return MARKERS.get(signum, "PREEMPTED"), 128 + int(signum), f"{name} received; {where}"


class SignalCheckpoint(pl.Callback):
    """Save ``last.ckpt`` (atomically: temp file + rename) when Lightning stops ``fit`` on a
    signal (``SIGTERMException`` at a batch boundary). Not on other errors, not outside fit,
    and not on a second Ctrl-C (a ``KeyboardInterrupt`` mid-step is not a consistent state)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        cb = trainer.checkpoint_callback
        dirpath = getattr(cb, "dirpath", None) or self.dirpath
        name = getattr(cb, "CHECKPOINT_NAME_LAST", None) or "last"
        path = os.path.join(dirpath, f"{name}.ckpt")
        tmp = path + ".signal.tmp"
        os.makedirs(dirpath, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)  # replaces a `last.ckpt` symlink itself, not its target
        _state.checkpoint = os.path.abspath(path)
        _state.epoch, _state.step = trainer.current_epoch, trainer.global_step
        log.warning("checkpoint saved on %s: %s (epoch %d, global step %d)",
                    signal.Signals(_state.signum or signal.SIGTERM).name, path,
                    trainer.current_epoch, trainer.global_step)
