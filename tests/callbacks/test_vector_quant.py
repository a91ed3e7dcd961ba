"""VectorQuantizationCallback (post-training VQ, Gong et al. 2014): layer selection, the
four methods' values against independent references, no retraining, real Trainer runs,
resume."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.vector_quant import VectorQuantizationCallback
from qtrain.nn.convert import LayerSelectionError
from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.pq_layers import PQLinear
from qtrain.nn.rq_layers import RQLinear
from tests.callbacks.tiny_lightning import trainer


class TinyMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1))), batch_size=batch)


KW = {"n_centroids": 8, "block_size": 4, "n_stages": 2, "bits": 2, "n_iter": 5}
TYPES = {"binary": QuantLinear, "kmeans": QuantLinear, "pq": PQLinear, "rq": RQLinear}


def _setup(method, **kw):
    torch.manual_seed(0)
    model = TinyMLP()
    cb = VectorQuantizationCallback(method, **{**KW, "include": [r"fc\d"], **kw})
    cb.setup(None, model)
    return model, cb


@pytest.mark.parametrize("method", ["binary", "kmeans", "pq", "rq"])
def test_replaces_exactly_the_selected_layers(method):
    model, cb = _setup(method)
    w1 = model.fc1.weight.detach().clone()
    head = model.head
    cb.apply(model)
    assert type(model.fc1) is TYPES[method] and type(model.fc2) is TYPES[method]
    assert model.head is head and type(head) is nn.Linear and head.weight.requires_grad
    assert not any(p.requires_grad for p in model.fc1.parameters())  # no retraining
    assert not any(p.requires_grad for p in model.fc2.parameters())
    q = model.fc1.quantized_weight() if method in ("binary", "kmeans") else model.fc1.weight
    if method == "binary":  # alpha * sign(W), alpha = mean|W| per output row, sign(0) = +1
        ref = w1.abs().mean(1, keepdim=True) * torch.where(w1 >= 0, 1.0, -1.0)
        torch.testing.assert_close(q, ref)
    elif method == "kmeans":  # 4 shared values; each weight at its nearest value
        vals = model.fc1.weight_quantizer.codebook
        assert vals.numel() == 4 and torch.unique(q).numel() == 4
        nearest = vals[(w1.reshape(-1, 1) - vals).abs().argmin(1)].reshape(w1.shape)
        assert torch.equal(q, nearest)
        for v in vals:  # k-means fixed point: each value is its cluster's mean (fp16)
            assert float(w1[q == v].mean()) == pytest.approx(float(v), abs=2e-3)
    else:  # sub-vectors of 4 consecutive input columns, at most 8 distinct ones per stage
        blocks = q.reshape(-1, 4)
        if method == "pq":
            assert torch.unique(blocks, dim=0).shape[0] <= 8
        else:
            assert torch.unique(blocks, dim=0).shape[0] <= 64 and model.fc1.n_stages == 2
        err = float(((q - w1) ** 2).sum())
        assert err < 0.5 * float((w1 ** 2).sum())
    with torch.no_grad():
        model(torch.randn(2, 16))


def test_regex_matching_nothing_raises():
    with pytest.raises(LayerSelectionError, match=r"include: pattern 'conv\.\*' matches no"):
        _setup("pq", include=[r"conv.*"])
    with pytest.raises(LayerSelectionError, match="exclude: pattern 'nothing'"):
        _setup("pq", exclude=["nothing"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="method='lloyd'"):
        VectorQuantizationCallback("lloyd")
    with pytest.raises(ValueError, match="bits=9"):
        VectorQuantizationCallback("kmeans", bits=9)
    with pytest.raises(ValueError, match="block_size divides|block_size=5"):
        _setup("pq", block_size=5)
    with pytest.raises(ValueError, match="n_centroids=8 is larger than the number of sub-vectors"):
        _setup("rq", include=["head"], block_size=16)


def test_trainer_fp32_phase_then_quantized_head_keeps_training(tmp_path):
    """Real Trainer: FP32 epoch 0, VQ at the start of epoch 1; fc1/fc2 frozen from then on
    while the float head trains; checkpoint -> resume restores the layers, no re-fit."""
    torch.manual_seed(0)
    model = TinyMLP()
    cb = VectorQuantizationCallback("rq", **KW, include=[r"fc\d"], start_epoch=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    snap = {}

    class Snap(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snap[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    t = trainer(max_epochs=2, callbacks=[cb, ckpt, Snap()], enable_checkpointing=True,
                limit_val_batches=1)
    t.fit(model, loader(), loader())
    assert cb.applied and cb.applied_epoch == 1 and cb.fp32_metric is not None
    assert type(model.fc1) is RQLinear and type(model.head) is nn.Linear
    assert t.global_step == 8  # 4 batches per epoch, both epochs trained
    assert not torch.equal(snap[0]["head.weight"], snap[1]["head.weight"])  # head trains
    # the quantized fc1 never changed after VQ: its weight = the fitted stages
    stages = snap[1]["fc1.stage_centroids"]
    assert torch.equal(model.fc1.stage_centroids, stages)
    assert torch.equal(snap[1]["fc1.bias"], model.fc1.bias)

    # resume into a fresh float model with a fresh callback: layers rebuilt, not re-fitted
    torch.manual_seed(1)
    model2 = TinyMLP()
    cb2 = VectorQuantizationCallback("rq", **KW, include=[r"fc\d"], start_epoch=1)

    def no_refit(*a, **k):
        raise AssertionError("re-quantized on resume")

    cb2.apply = no_refit
    t2 = trainer(max_epochs=3, callbacks=[cb2], limit_val_batches=1)
    t2.fit(model2, loader(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb2.applied and cb2.applied_epoch == 1 and cb2.layer_names == ["fc1", "fc2"]
    assert type(model2.fc1) is RQLinear and type(model2.fc2) is RQLinear
    assert torch.equal(model2.fc1.stage_codes, model.fc1.stage_codes)
    assert torch.equal(model2.fc2.stage_centroids, model.fc2.stage_centroids)
    assert not any(p.requires_grad for p in model2.fc1.parameters())
    assert t2.global_step == 12


@pytest.mark.parametrize("method", ["kmeans", "binary"])
def test_resume_restores_kmeans_and_binary(method, tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    cb = VectorQuantizationCallback(method, **KW, include=[r"fc\d"], start_epoch=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True, limit_val_batches=1)
    t.fit(model, loader(), loader())
    torch.manual_seed(1)
    model2 = TinyMLP()
    cb2 = VectorQuantizationCallback(method, **KW, include=[r"fc\d"], start_epoch=1)
    t2 = trainer(max_epochs=2, callbacks=[cb2], limit_val_batches=1)
    t2.fit(model2, loader(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert type(model2.fc1) is QuantLinear and cb2.applied
    x = torch.randn(3, 16)
    assert torch.equal(model2.eval()(x), model.eval()(x))
    wrong = VectorQuantizationCallback("pq" if method == "kmeans" else "kmeans", **KW)
    with pytest.raises(ValueError, match="checkpoint was quantized with method="):
        wrong.load_state_dict(cb2.state_dict())


def test_all_layers_quantized_stops_fit_and_end_of_fit_path():
    torch.manual_seed(0)
    model = TinyMLP()
    cb = VectorQuantizationCallback("pq", **KW, start_epoch=1)  # every layer incl. head
    t = trainer(max_epochs=3, callbacks=[cb], limit_val_batches=1)
    t.fit(model, loader(), loader())
    assert cb.applied_epoch == 1 and t.global_step == 4  # nothing trainable: stopped
    assert type(model.head) is PQLinear

    torch.manual_seed(0)
    model = TinyMLP()
    cb = VectorQuantizationCallback("kmeans", **KW, start_epoch=2)  # = max_epochs: at the end
    t = trainer(max_epochs=2, callbacks=[cb], limit_val_batches=1)
    t.fit(model, loader(), loader())
    assert cb.applied and t.global_step == 8 and type(model.head) is QuantLinear
    assert cb.fp32_metric == pytest.approx(float(t.callback_metrics["val_acc"]))
