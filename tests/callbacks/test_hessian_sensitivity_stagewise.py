"""HAWQ V1 stage-wise fine-tuning (Dong et al. 2019 sec. 3.3) in a real pl.Trainer: blocks
are quantized one stage at a time in descending Omega_i = lambda_i ||Q(W_i) - W_i||^2; the
ones not reached are quantized at the end of fit; resume continues the stages."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from qtrain.callbacks.hessian_sensitivity import HessianSensitivity
from qtrain.errors import ConfigError
from tests.callbacks.test_hessian_sensitivity_callback import LAYERS, Tiny, loader
from tests.hessian.test_hawq_v1 import _np_perturbation
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture


class _Probe(pl.Callback):
    """Per training step: the layers whose forward weight is quantized (differs from W)."""

    def __init__(self):
        self.quantized = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        with torch.no_grad():
            self.quantized.append({n for n in LAYERS if not torch.equal(
                pl_module.get_submodule(n).quantized_weight(),
                pl_module.get_submodule(n).weight)})


def _trainer(cbs, root, **kw):
    base = dict(accelerator="cpu", devices=1, logger=False, callbacks=cbs, default_root_dir=root,
                enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kw)
    return pl.Trainer(**base)


def _cb(**kw):
    return HessianSensitivity(method="hawq_v1", num_batches=2, average_bits=4.0,
                              bit_choices=(2, 4, 8), eig_max_iter=30, stage_unit="step", **kw)


def test_stages_follow_omega_descending_one_per_step(tmp_path):
    model = Tiny()
    w0 = {n: model.get_submodule(n).weight.detach().double().numpy().copy() for n in LAYERS}
    cb, probe = _cb(), _Probe()
    _trainer([cb, probe], tmp_path, max_steps=4).fit(model, loader())
    rows = {r["layer"]: r for r in cb.rows}
    # hand: Omega_i = lambda_i * ||Q_{b_i}(W_i) - W_i||^2 on the weights analysed (at start)
    om = {n: rows[n]["curvature"] * _np_perturbation(w0[n], cb.bits[n]) for n in LAYERS}
    order = sorted(LAYERS, key=lambda n: -om[n])
    assert cb.stages == [[n] for n in order]
    for n in LAYERS:
        assert rows[n]["omega"] == pytest.approx(om[n], rel=1e-4)
    # step 0: stage 0 quantized only; step 1: stages 0-1; step 2 on: all
    assert probe.quantized == [set(order[:1]), set(order[:2]), set(order), set(order)]
    # precision from the S order: a larger S_i never has fewer bits
    for i in LAYERS:
        for j in LAYERS:
            if rows[i]["sensitivity"] > rows[j]["sensitivity"]:
                assert cb.bits[i] >= cb.bits[j]


def test_stages_not_reached_are_quantized_at_end_and_resume(tmp_path):
    model = Tiny()
    cb, probe = _cb(stage_length=3), _Probe()
    t = _trainer([cb, probe], tmp_path, max_steps=4)
    with pytest.warns(UserWarning, match="not reached by the run"):
        t.fit(model, loader())
    assert [len(q) for q in probe.quantized] == [1, 1, 1, 2] and cb.stage == 3
    with torch.no_grad():  # after fit: every analysed weight is quantized
        for n in LAYERS:
            m = model.get_submodule(n)
            assert not torch.equal(m.quantized_weight(), m.weight), n

    # resume mid-schedule: the checkpoint written at step 4 (stages 0-1 quantized) continues
    # with stage 2 at step 6, without a new analysis
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    cb = _cb(stage_length=3)
    _trainer([cb, saver], tmp_path, max_steps=4, enable_checkpointing=True).fit(Tiny(), loader())
    (ckpt,) = tmp_path.glob("*.ckpt")
    cb2, probe2 = _cb(stage_length=3), _Probe()
    _trainer([cb2, probe2], tmp_path, max_steps=8).fit(Tiny(), loader(), ckpt_path=str(ckpt))
    assert [len(q) for q in probe2.quantized] == [2, 2, 3, 3]  # steps 4..7
    assert cb2.stages == cb.stages and cb2.bits == cb.bits and cb2.stage == 3


def test_stagewise_options(tmp_path):
    with pytest.raises(ConfigError, match="stagewise=true needs method='hawq_v1'"):
        HessianSensitivity(method="hawq_v2", average_bits=4.0, stagewise=True)
    with pytest.raises(ConfigError, match="stage_unit='batch'"):
        HessianSensitivity(method="hawq_v1", average_bits=4.0, stage_unit="batch")
    assert not HessianSensitivity(method="hawq_v2", average_bits=4.0).stagewise  # V2 as is
    model = Tiny()
    cb, probe = _cb(stagewise=False), _Probe()
    _trainer([cb, probe], tmp_path, max_steps=2).fit(model, loader())
    assert cb.stages == [] and probe.quantized == [set(LAYERS)] * 2
    np.testing.assert_array_equal(sorted(cb.bits), sorted(LAYERS))
