"""``python train.py`` as a user (or a scheduler) runs it: a real subprocess, real signals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.hydra_helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
# a run that cannot finish on its own while a test waits for it (a few ms per smoke epoch)
ENDLESS = ["debug=smoke", "trainer.max_epochs=1000000"]


def train_py(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start(*args, cwd) -> subprocess.Popen:
    """Started in the background; stdout/stderr go to files (a full pipe would block it)."""
    out = open(Path(cwd) / f"stdout_{time.monotonic_ns()}.txt", "w+")
    err = open(Path(cwd) / f"stderr_{time.monotonic_ns()}.txt", "w+")
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                         stdout=out, stderr=err, text=True)
    p.out_file, p.err_file = out, err
    return p


def stderr_of(p: subprocess.Popen) -> str:
    p.err_file.seek(0)
    return p.err_file.read()


def wait_for(cond, p: subprocess.Popen, timeout: float = 400, what: str = "") -> None:
    """Poll ``cond()`` until true; fail if the process ends first or time runs out."""
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"train.py ended (rc {p.returncode}) before {what}:\n"
                                 + stderr_of(p)[-3000:])
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def training_started(run_dir: Path):
    """True once the CSV logger has written a training step (inside ``trainer.fit``)."""
    def cond():
        for f in Path(run_dir).rglob("metrics.csv"):
            if "train_loss_step" in f.read_text() and len(f.read_text().splitlines()) > 2:
                return True
        return False
    return cond
