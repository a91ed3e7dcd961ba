"""Report the bytes a DDP communication hook sent (Dettmers 2016 8-bit exchange,
:mod:`qtrain.comm.eight_bit`): after every training epoch the logged metric
``comm_ratio_sent_to_fp32`` (bytes this rank handed to the collective / bytes the default fp32
all-reduce would have handed to it), and at the end of fit ``<run dir>/comm_hook.json`` (rank
0) with every rank's counters. Counters start when the process starts: a resumed run counts
from the resume. Without a hook that keeps counters (single process, plain ``ddp``) it writes
``{"hook": null}`` and logs nothing."""

from __future__ import annotations

import json
import os

import pytorch_lightning as pl
import torch.distributed as dist


def _state(trainer: pl.Trainer):
    state = getattr(trainer.strategy, "comm_state", None)
    return state if hasattr(state, "stats") else None


class CommBytesReport(pl.Callback):
    def __init__(self, filename: str = "comm_hook.json") -> None:
        self.filename = filename

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = _state(trainer)
        if state is not None and state.bytes_fp32:
            pl_module.log("comm_ratio_sent_to_fp32", state.stats()["ratio_sent_to_fp32"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = _state(trainer)
        stats = state.stats() if state is not None else None
        ranks = [stats]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            dist.all_gather_object(ranks, stats)
        if trainer.is_global_zero:
            out = {"hook": type(state).__name__ if state is not None else None,
                   "world_size": trainer.world_size, "ranks": ranks}
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(os.path.join(trainer.default_root_dir, self.filename), "w") as f:
                json.dump(out, f, indent=1)
