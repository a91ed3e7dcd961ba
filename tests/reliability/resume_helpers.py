"""Shared by the resume tests: a callback that SIGKILLs its own process at a given step (the
real signal, no cleanup: what an OOM killer or a lost node does), runs of ``train.py`` as
subprocesses, and the comparison of two final checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytorch_lightning as pl
import torch

from tests.hydra_helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class KillAtStep(pl.Callback):
    """``kill -9`` this process when training reaches ``global_step == step`` (at the start
    of that batch: the step's forward/backward has not run; the last checkpoint is older)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_overrides(step: int) -> list[str]:
    return [f"+extra_callbacks.kill._target_={__name__}.KillAtStep",
            f"+extra_callbacks.kill.step={step}"]


def train_py(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def final_state(path) -> dict:
    """Every tensor of a checkpoint that a resumed run must reproduce, by a flat name:
    model state dict, optimizer and scheduler states, the method callbacks' states and the
    RNG states (not the checkpoint callback's bookkeeping, which holds file paths)."""
    ckpt = torch.load(path, weights_only=True)
    out: dict = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            out[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}")
        else:  # numbers, strings, None: compared by repr
            out[name] = obj

    for key in ("state_dict", "optimizer_states", "lr_schedulers", "rng_states"):
        walk(ckpt.get(key), key)
    for key, state in ckpt["callbacks"].items():
        if not key.startswith(("RunCheckpoint", "ModelCheckpoint")):
            walk(state, f"callbacks.{key}")
    out["global_step"], out["epoch"] = ckpt["global_step"], ckpt["epoch"]
    return out


def differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bitwise equal, other values not equal (by repr), or
    present in one only."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if repr(x) != repr(y):
                bad.append(k)
        elif x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.reshape(-1).view(torch.uint8) if x.numel() else x,
                y.reshape(-1).view(torch.uint8) if y.numel() else y):
            bad.append(k)
    return bad
