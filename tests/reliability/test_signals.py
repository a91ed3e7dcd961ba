"""SIGTERM / SIGUSR1 / SIGINT sent to a real ``python train.py`` mid-training: a checkpoint
of the state at the stop, a marker saying why, an exit status that is not success.

Default suite: SIGTERM and SIGINT mid-training (one subprocess each, ~20 s on 2 cores).
``-m slow``: SIGUSR1, a signal before training starts, and resuming from the checkpoint."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from tests.reliability.procs import ENDLESS, start, stderr_of, train_py, training_started, wait_for


def _stop_mid_training(tmp_path, sig):
    run = tmp_path / "run"
    p = start(*ENDLESS, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(training_started(run), p, what="the first training steps")
    p.send_signal(sig)
    rc = p.wait(timeout=300)
    return run, rc, stderr_of(p)


def _check_stopped(run, rc, err, want_rc, marker, name):
    assert rc == want_rc, err[-3000:]
    text = (run / marker).read_text()
    assert text.startswith(f"{marker}: {name} received"), text
    ckpt = run / "checkpoints" / "last.ckpt"
    assert str(ckpt) in text, text
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] > 0
    assert f"epoch {state['epoch']}, global step {state['global_step']}" in text
    assert not (run / "summary.json").exists()  # only finished runs have a summary
    assert not (run / "FAILED").exists() and not (run / "RUNNING").exists()
    assert f"{marker.lower()}: {name} received" in err
    return state


def test_sigterm_saves_checkpoint_and_exits_preempted(tmp_path):
    run, rc, err = _stop_mid_training(tmp_path, signal.SIGTERM)
    _check_stopped(run, rc, err, 128 + signal.SIGTERM, "PREEMPTED", "SIGTERM")


def test_sigint_saves_checkpoint_and_exits_130(tmp_path):
    run, rc, err = _stop_mid_training(tmp_path, signal.SIGINT)
    _check_stopped(run, rc, err, 130, "INTERRUPTED", "SIGINT")


@pytest.mark.slow
def test_sigusr1_then_resume_continues_from_the_saved_step(tmp_path):
    run, rc, err = _stop_mid_training(tmp_path, signal.SIGUSR1)
    state = _check_stopped(run, rc, err, 128 + signal.SIGUSR1, "PREEMPTED", "SIGUSR1")
    # the documented resume: ckpt_path=<run dir>/checkpoints/last.ckpt, no quoting needed
    r = train_py("debug=smoke", f"trainer.max_epochs={state['epoch'] + 2}",
                 f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/resumed",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["epochs"] == state["epoch"] + 2
    assert summary["global_step"] > state["global_step"]


@pytest.mark.slow
def test_sigterm_before_training_leaves_marker_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = start("debug=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(lambda: (run / "RUNNING").exists(), p, what="the run dir lock")
    p.send_signal(signal.SIGTERM)  # during data preparation / model build
    rc = p.wait(timeout=300)
    assert rc == 128 + signal.SIGTERM, stderr_of(p)[-3000:]
    text = (run / "PREEMPTED").read_text()
    assert re.match(r"PREEMPTED: SIGTERM received; no checkpoint saved", text), text
    assert not (run / "summary.json").exists() and not (run / "RUNNING").exists()
