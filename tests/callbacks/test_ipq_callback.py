"""Iterative PQ callback with a real pl.Trainer: stages, optimizer rebuild, resume, errors."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.nn.pq_layers import PQConv2d, PQEmbedding, PQLinear, is_pq
from tests.callbacks.tiny_lightning import TinyCNN, TinyTransformerish, image_loader, token_loader
from tests.callbacks.tiny_lightning import trainer as make_trainer


class _OptimizerProbe(pl.Callback):
    def __init__(self):
        self.ok, self.n_pq = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        in_opt = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        live = [p for p in pl_module.parameters() if p.requires_grad]
        self.ok.append(len(in_opt) == len(live) and {id(p) for p in in_opt} == {id(p) for p in live})
        self.n_pq.append(sum(is_pq(m) for m in pl_module.modules()))


def _ipq(**kw):
    base = dict(stages="fairseq_transformer", n_centroids=16, n_iter=5, unit="step",
                boundaries=[2, 5, 9])
    base.update(kw)
    return IterativePQCallback(**base)


def test_stages_replace_layers_in_order_and_optimizer_holds_live_params():
    pl.seed_everything(0)
    model = TinyTransformerish()
    cb, probe = _ipq(), _OptimizerProbe()
    make_trainer(max_steps=12, callbacks=[cb, probe]).fit(model, token_loader())
    assert all(probe.ok)
    # FFN at step 2, embeddings at 5, attention at 9 (boundaries not multiples of the epoch)
    assert probe.n_pq[1] == 0 and probe.n_pq[2] == 2 and probe.n_pq[5] == 3 and probe.n_pq[9] == 5
    assert isinstance(model.fc1, PQLinear) and model.fc1.block_size == 8
    assert isinstance(model.q_proj, PQLinear) and model.q_proj.block_size == 4
    assert isinstance(model.embed_tokens, PQEmbedding) and model.embed_tokens.block_size == 8
    assert not is_pq(model.head)
    assert set(cb.codebooks) == {"fc1", "fc2", "embed_tokens", "q_proj", "out_proj"}
    # centroids were finetuned after the fit (trainable), assignments frozen
    assert not torch.equal(model.fc1.centroids.detach(), cb.codebooks["fc1"]["centroids"])
    assert torch.equal(model.fc1.assignments, cb.codebooks["fc1"]["assignments"])


def test_resume_mid_stage_equals_uninterrupted(tmp_path):
    pl.seed_everything(0)
    full = TinyTransformerish()
    make_trainer(max_epochs=4, callbacks=[_ipq()]).fit(full, token_loader())  # 16 steps

    pl.seed_everything(0)
    part = TinyTransformerish()
    # 8 steps: inside stage 1 (5..8); the checkpoint the run writes at the end of its last
    # epoch (before on_train_end, which quantizes the stages not reached: test_ipq_incomplete)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="mid", save_top_k=1)
    t1 = make_trainer(max_epochs=2, callbacks=[_ipq(), saver], enable_checkpointing=True)
    t1.fit(part, token_loader())
    ckpt = tmp_path / "mid.ckpt"

    pl.seed_everything(123)  # different init: everything must come from the checkpoint
    resumed = TinyTransformerish()
    cb = _ipq()
    make_trainer(max_epochs=4, callbacks=[cb]).fit(resumed, token_loader(), ckpt_path=str(ckpt))
    assert cb.stage == 3
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_cnn_preset_activation_aware_and_block_sizes():
    pl.seed_everything(0)
    model = TinyCNN()
    cb = IterativePQCallback(stages="cnn", n_centroids=8, n_iter=3, unit="step",
                             boundaries=[0, 1, 2], activation_aware=True)
    probe = _OptimizerProbe()
    make_trainer(max_steps=4, callbacks=[cb, probe]).fit(model, image_loader())
    assert isinstance(model.conv1, PQConv2d) and model.conv1.block_size == 9
    assert isinstance(model.conv2, PQConv2d) and model.conv2.block_size == 4
    assert isinstance(model.fc, PQLinear) and model.fc.block_size == 8
    assert all(probe.ok)
    assert cb.storage_bits(model) == sum(m.storage_bits() for m in (model.conv1, model.conv2, model.fc))


def test_bad_inputs_name_layer_and_value():
    model = TinyTransformerish()
    with pytest.raises(ValueError, match="nomatch"):
        make_trainer(max_steps=1, callbacks=[_ipq(stages=[["nomatch"]], boundaries=[0])]).fit(
            model, token_loader())
    with pytest.raises(ValueError, match=r"fc1.*block_size=5"):
        cb = _ipq(stages=[{"include": ["fc1"], "block_size": 5}], boundaries=[0])
        make_trainer(max_steps=1, callbacks=[cb]).fit(TinyTransformerish(), token_loader())
    with pytest.raises(ValueError, match=r"head.*n_centroids=256"):
        cb = _ipq(stages=[["head"]], boundaries=[0], n_centroids=256)
        make_trainer(max_steps=1, callbacks=[cb]).fit(TinyTransformerish(), token_loader())
    with pytest.raises(ValueError, match="preset"):
        IterativePQCallback(stages="vgg")
