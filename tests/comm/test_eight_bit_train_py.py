"""The recipe through ``train.py`` with 2 real CPU processes (Lightning DDP, gloo) and the
8-bit comm hook (CommHookDDPStrategy): every rank's hook ran on every step and sent
N codes + 4 bytes per gradient tensor, ~1/4 of the fp32 all-reduce (comm_hook.json)."""

import json
import os
import subprocess
import sys

import pytest

from tests.hydra_helpers import ROOT

# debug=smoke makes the run single-process (strategy auto): put the 8-bit DDP strategy back
STRATEGY = ("trainer.strategy={_target_:qtrain.comm.strategy.CommHookDDPStrategy,"
            "ddp_comm_state:{_target_:qtrain.comm.eight_bit.EightBitState,format:dynamic_tree},"
            "ddp_comm_hook:{_target_:hydra.utils.get_method,"
            "path:qtrain.comm.eight_bit.eight_bit_hook}}")


@pytest.mark.slow  # 2 Lightning processes via train.py: ~11 s CPU, 3.5 min wall at load 11
def test_recipe_two_processes_sends_8bit(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", "recipe=dettmers8bit_ddp_mnist", "debug=smoke",
           "trainer.devices=2", STRATEGY, f"hydra.run.dir={tmp_path}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    comm = json.loads((tmp_path / "comm_hook.json").read_text())
    assert comm["hook"] == "EightBitState" and comm["world_size"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["global_step"]
    assert steps > 0
    r0, r1 = comm["ranks"]
    assert r0 == r1  # same buckets, same payload sizes on both ranks
    assert r0["buckets"] >= steps and r0["bytes_sent"] > 0
    n = r0["bytes_fp32"] // 4
    extra = r0["bytes_sent"] - n  # the scales: 4 bytes per gradient tensor per bucket
    assert extra > 0 and extra % 4 == 0
    assert 0.25 < r0["ratio_sent_to_fp32"] < 0.3
