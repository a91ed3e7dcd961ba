"""Run directories: two runs started together get two folders and both finish; a folder in
use (its ``RUNNING`` lock held by a live process) is never shared; a lock left by a killed
run is taken over."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.reliability.procs import ENDLESS, start, stderr_of, train_py, training_started, wait_for

NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}")  # time down to microseconds


def test_two_concurrent_runs_get_their_own_dirs_and_both_finish(tmp_path):
    procs = [start("debug=smoke", cwd=tmp_path) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, stderr_of(p)[-3000:]
    dirs = sorted((tmp_path / "runs" / "qat_int4_digits").iterdir())
    assert len(dirs) == 2 and all(NAME.fullmatch(d.name) for d in dirs), dirs
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        assert s["run_dir"] == str(d) and s["global_step"] > 0
        assert (d / "checkpoints" / "last.ckpt").exists()
        assert not (d / "RUNNING").exists() and not (d / "FAILED").exists()
        with open(d / "csv" / "metrics.csv") as f:  # its own logger: only its own steps
            steps = [row for row in csv.DictReader(f) if row["train_loss_step"]]
        assert len(steps) == s["global_step"]


def test_lock_in_process_live_refused_stale_taken_over(tmp_path):
    from qtrain.cli import LOCK, acquire, release
    from qtrain.errors import ConfigError

    held = f"pid {os.getpid()} host {socket.gethostname()} started now\n"  # a live process
    (tmp_path / LOCK).write_text(held)
    with pytest.raises(ConfigError, match="is in use by another run"):
        acquire(str(tmp_path))
    assert (tmp_path / LOCK).read_text() == held
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK).write_text(f"pid {gone} host {socket.gethostname()} started then\n")
    path = acquire(str(tmp_path))  # the process is gone: taken over
    assert (tmp_path / LOCK).read_text().startswith(f"pid {os.getpid()} ")
    release(path)
    assert not (tmp_path / LOCK).exists()


@pytest.mark.slow
def test_dir_in_use_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "RUNNING"
    held = f"pid {os.getpid()} host {socket.gethostname()} started now\n"  # a live process
    lock.write_text(held)
    r = train_py("debug=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ConfigError: run directory") and "in use" in lines[-1]
    assert "Traceback" not in r.stderr
    assert lock.read_text() == held  # the other run's lock and folder are untouched
    assert not (run / "FAILED").exists() and not (run / "summary.json").exists()


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    p = start(*ENDLESS, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(training_started(run), p, what="the first training steps")
    p.send_signal(signal.SIGKILL)  # no handler runs: RUNNING stays, naming a dead pid
    p.wait(timeout=60)
    assert f"pid {p.pid} " in (run / "RUNNING").read_text()
    r = train_py("debug=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "summary.json").exists() and not (run / "RUNNING").exists()
