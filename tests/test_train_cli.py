"""train.py as a user runs it: default smoke run, a two-job multirun, --help, bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.hydra_helpers import ROOT
from tests.test_sweep_summary import real_sweep

ENV = {**os.environ, "WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# train.py as the user runs it, then one line saying whether torch was ever imported
WRAP = ("import runpy, sys\nsys.argv = sys.argv[1:]  # [train.py, *args]\ntry:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
        "    print('TORCH_IMPORTED', 'torch' in sys.modules, flush=True)\n")


def train_py(*args, cwd, report_torch=False):
    cmd = [sys.executable, "-c", WRAP] if report_torch else [sys.executable]
    return subprocess.run([*cmd, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_help_lists_recipes(tmp_path):
    r = train_py("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "qat_int4_digits" in r.stdout and "qat_int8_resnet20_cifar10" in r.stdout


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path):
    """Exactly the documented command (no hydra.sweep.dir override: the default must resolve),
    every job finished: exit status 0. Slow: the default suite checks the same per-job files
    on the session's shared multirun (``test_multirun_jobs_each_get_their_run_files``, the
    same command with a third, failing job: tests/test_sweep_summary.py real_sweep), and exit
    status 0 of a finished sweep in tests/test_optuna_sweeper.py."""
    r = train_py("-m", "recipe=qat_int4_digits", "debug=smoke", "quant.bits=4,8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun").iterdir()  # multirun/<time>/<recipe>/<job>
    jobs = sorted(p for p in (sweep / "qat_int4_digits").iterdir()
                  if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_quant.bits-4", "1_quant.bits-8"]  # no '=': unquoted
    bits = []
    for j in jobs:
        assert json.loads((j / "summary.json").read_text())["quant_mb"] > 0
        assert (j / "csv" / "metrics.csv").exists()  # its own logger run
        assert (j / ".hydra" / "overrides.yaml").exists()
        assert (j / "checkpoints" / "last.ckpt").exists()
        bits.append(json.loads((j / "summary.json").read_text())["quant_mb"])
    assert bits[0] < bits[1]  # 4-bit model is smaller than the 8-bit one


def test_multirun_jobs_each_get_their_run_files():
    """``train.py -m recipe=qat_int4_digits debug=smoke ... quant.bits=2,4,12`` (the session's
    shared multirun, no hydra.sweep.dir override): each finished job has its own summary,
    logger run, overrides and checkpoint under multirun/<time>/<recipe>/<job>, and its
    override took effect (the 2-bit model is smaller than the 4-bit one)."""
    sweep = real_sweep()["sweep"]
    assert sweep.parent.name == "multirun"  # the default sweep dir resolved
    jobs = sorted(p for p in (sweep / "qat_int4_digits").iterdir()
                  if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_quant.bits-2", "1_quant.bits-4", "2_quant.bits-12"]
    sizes = []
    for j in jobs[:2]:
        summary = json.loads((j / "summary.json").read_text())
        assert summary["quant_mb"] > 0 and summary["global_step"] > 0
        assert (j / "csv" / "metrics.csv").exists()  # its own logger run
        assert (j / ".hydra" / "overrides.yaml").exists()
        assert (j / "checkpoints" / "last.ckpt").exists()
        sizes.append(summary["quant_mb"])
    assert sizes[0] < sizes[1]  # 2-bit model is smaller than the 4-bit one


def _fails_fast(args, needle, tmp_path, report_torch=False):
    t = time.time()
    r = train_py(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, report_torch=report_torch)
    assert r.returncode != 0
    assert time.time() - t < 120  # a hang would take the 600 s timeout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any(needle in ln for ln in lines), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    return r


def test_bad_bits(tmp_path):
    _fails_fast(["debug=smoke", "quant.bits=12"], "quant.bits=12", tmp_path)


def test_regex_matching_nothing(tmp_path):
    _fails_fast(["debug=smoke", "quant.include=[nothing_like_this]"], "nothing_like_this", tmp_path)


def test_unknown_recipe(tmp_path):
    _fails_fast(["recipe=no_such_recipe"], "no_such_recipe", tmp_path)


def test_missing_dataset_offline(tmp_path):
    """A dataset folder that is not there (CIFAR-10, data.download=false): one line naming
    data.root, exit status 2, FAILED, before torch is imported (qtrain.data.preflight)."""
    r = _fails_fast(["recipe=qat_int8_resnet20_cifar10", f"data.root={tmp_path}/absent"],
                    "data.root", tmp_path, report_torch=True)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [f"error: MissingFileError: data.root='{tmp_path}/absent': no such folder (set "
                   "data.root to the folder holding the dataset in its standard layout, or "
                   "data.download=true to fetch it)"], r.stderr[-2000:]
    assert "TORCH_IMPORTED False" in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "run" / "FAILED").read_text().startswith("MissingFileError: data.root=")
