"""kill -9 a real ``python train.py`` that trains on the tensor data path
(``data.loader=tensor``: uint8 CIFAR smoke pickles in memory, crop + flip + normalisation in
``on_after_batch_transfer``), resume with ``ckpt_path=last``: the final checkpoint equals an
uninterrupted run's bitwise (model, optimizer, scheduler, callbacks, RNG states). In the
style of tests/reliability/test_resume.py, with its helpers."""

from __future__ import annotations

import signal

import pytest

from tests.hydra_helpers import run
from tests.reliability.resume_helpers import differing, final_state, kill_overrides, train_py

# 64 smoke images / batch 16 = 4 batches, limit 3 per epoch (debug=smoke): 9 steps
COMMON = ["recipe=qat_int8_resnet20_cifar10", "debug=smoke", "data.loader=tensor",
          "data.batch_size=16", "trainer.max_epochs=3", "trainer.deterministic=true"]


@pytest.mark.slow  # 3 train.py runs, ~30 s of CPU
@pytest.mark.parametrize("kill_step, every", [(5, 2), (6, 0)], ids=["mid_epoch", "epoch_boundary"])
def test_kill9_then_resume_is_bitwise_on_the_tensor_path(tmp_path, kill_step, every):
    """mid_epoch: checkpoints every 2 steps, killed at the start of step 5 (last checkpoint:
    step 4, one batch into epoch 2, so the loader skips one batch on resume);
    epoch_boundary: epoch checkpoints only, killed as epoch 3 starts."""
    common = COMMON + ([f"callbacks.checkpoint.every_n_train_steps={every}"] if every else [])
    runs = tmp_path / "runs"
    run(common, tmp_path / "reference")
    killed = train_py(common + kill_overrides(kill_step) + [f"hydra.run.dir={runs}/1_killed"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train_py(common + ["ckpt_path=last", f"hydra.run.dir={runs}/2_resumed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = final_state(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    res = final_state(runs / "2_resumed" / "checkpoints" / "last.ckpt")
    assert ref["global_step"] == res["global_step"] == 9 and len(ref) > 100
    assert differing(ref, res) == []
