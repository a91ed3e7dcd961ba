"""train.py as a user runs it: default smoke run, a two-job multirun, --help, bad input."""

import json
import os
import subprocess
import sys
import time

from tests.hydra_helpers import ROOT

ENV = {**os.environ, "WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def train_py(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_help_lists_recipes(tmp_path):
    r = train_py("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "qat_int4_digits" in r.stdout and "qat_int8_resnet20_cifar10" in r.stdout


def test_multirun_two_jobs(tmp_path):
    # exactly the documented command (no hydra.sweep.dir override: the default must resolve)
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


def _fails_fast(args, needle, tmp_path):
    t = time.time()
    r = train_py(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode != 0
    assert time.time() - t < 120  # a hang would take the 600 s timeout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any(needle in ln for ln in lines), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_bits(tmp_path):
    _fails_fast(["debug=smoke", "quant.bits=12"], "quant.bits=12", tmp_path)


def test_regex_matching_nothing(tmp_path):
    _fails_fast(["debug=smoke", "quant.include=[nothing_like_this]"], "nothing_like_this", tmp_path)


def test_unknown_recipe(tmp_path):
    _fails_fast(["recipe=no_such_recipe"], "no_such_recipe", tmp_path)


def test_missing_dataset_offline(tmp_path):
    _fails_fast(["recipe=qat_int8_resnet20_cifar10", f"data.root={tmp_path}/absent"],
                "data.root", tmp_path)
