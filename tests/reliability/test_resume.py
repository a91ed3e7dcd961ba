"""kill -9 a real ``python train.py`` at a step, resume with ``ckpt_path=last``: the final
checkpoint equals an uninterrupted run's bitwise (model, optimizer, scheduler, method
callbacks' states, RNG states), with data augmentation on (CIFAR smoke files in the real
pickle format, RandomCrop + flip) and ``trainer.deterministic=true``, seed fixed.

Default suite: one CIFAR QAT run killed mid-epoch (resumed in the test process with 2
data-loader workers against a reference without workers). ``-m slow``: every recipe family,
killed mid-epoch and at an epoch boundary at a step drawn by a seeded RNG.
"""

from __future__ import annotations

import random
import signal

import pytest

from tests.hydra_helpers import run
from tests.reliability.resume_helpers import differing, final_state, kill_overrides, train_py

# 64 smoke images / batch 16 = 4 batches, limit 3 per epoch (debug=smoke)
CIFAR = ["data.batch_size=16", "trainer.max_epochs=3"]


def _kill_and_resume(tmp_path, recipe: str, extra: list[str], kill_step: int,
                     resume_extra: list[str] = (), resume_in_process: bool = False
                     ) -> tuple[dict, dict, list[str]]:
    """(uninterrupted final state, resumed final state, names that differ). The killed run is
    always a ``python train.py`` subprocess; the resume is one too, or with
    ``resume_in_process`` the same ``qtrain.run.train`` in this process (as the reference),
    which spares a fresh interpreter's ~10 s CPU of imports."""
    common = [f"recipe={recipe}", "debug=smoke", *extra]
    runs = tmp_path / "runs"
    run(common, tmp_path / "reference")
    killed = train_py(common + kill_overrides(kill_step) + [f"hydra.run.dir={runs}/1_killed"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (runs / "1_killed" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts, ckpts  # checkpoints exist while the run is going
    if resume_in_process:  # ckpt_path=last: the newest checkpoint of the sibling run dirs
        summary = run(common + list(resume_extra) + ["ckpt_path=last"], runs / "2_resumed")
        assert summary["global_step"] > kill_step
    else:
        resumed = train_py(common + list(resume_extra) + ["ckpt_path=last",
                                                          f"hydra.run.dir={runs}/2_resumed"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = final_state(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    res = final_state(runs / "2_resumed" / "checkpoints" / "last.ckpt")
    return ref, res, differing(ref, res)


def test_kill9_mid_epoch_then_resume_is_bitwise_cifar_qat(tmp_path):
    """Checkpoints every 2 steps; killed (a ``python train.py`` subprocess) at the start of
    step 6 (last checkpoint: step 4, one batch into epoch 2); resumed with ``ckpt_path=last``
    and 2 worker processes in this process, through ``qtrain.run.train`` as ``train.py``
    calls it (``-m slow``: every family, and the SIGUSR1 test of test_signals.py, resume
    through a ``train.py`` subprocess)."""
    ref, res, diff = _kill_and_resume(
        tmp_path, "qat_int8_resnet20_cifar10", CIFAR + ["callbacks.checkpoint.every_n_train_steps=2"],
        kill_step=5, resume_extra=["data.num_workers=2"], resume_in_process=True)
    assert ref["global_step"] == 9 and len(ref) > 100
    assert any(k.startswith("rng_states") for k in ref)
    assert diff == []


# recipe, overrides, training batches per epoch (smoke: limit_train_batches=3)
FAMILIES = {
    "qat": ("qat_int8_resnet20_cifar10", CIFAR, 3),
    "inq": ("inq_resnet20_cifar10", CIFAR, 3),
    "ipq_quant_noise": ("quant_noise_ipq_lm_ptb", ["trainer.max_epochs=3"], 2),
    "deep_compression": ("deep_compression_lenet300_mnist",  # every stage inside the run
                         ["data.batch_size=16", "trainer.max_epochs=3", "quant_start_epoch=1",
                          "quant.prune_epochs=[0,1]", "quant.quantize_epoch=1"], 3),
    "distillation": ("polino_quantized_distillation_resnet20_cifar10", CIFAR, 3),
    "apprentice": ("apprentice_resnet20_cifar10", CIFAR, 3),
    "hessian": ("hawq_resnet20_cifar10", CIFAR, 3),
}


@pytest.mark.slow  # 3 runs per case, ~1-2 min each on a shared 2-core CPU
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kill9_then_resume_is_bitwise_every_family(tmp_path, family, where):
    recipe, extra, nb = FAMILIES[family]
    rng = random.Random(f"{family}-{where}")
    if where == "mid_epoch":  # a checkpoint every step; killed inside epoch 2 or 3
        extra = extra + ["callbacks.checkpoint.every_n_train_steps=1"]
        step = rng.choice([g for g in range(nb + 1, 3 * nb) if g % nb])
    else:  # default config: epoch checkpoints only; killed as epoch 2 or 3 starts
        step = rng.choice([nb, 2 * nb])
    ref, res, diff = _kill_and_resume(tmp_path, recipe, extra, kill_step=step)
    assert ref["global_step"] == res["global_step"] == 3 * nb
    assert diff == []
