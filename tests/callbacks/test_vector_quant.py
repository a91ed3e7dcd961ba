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
        if method == "pq":  # one codebook per column segment: <= 8 distinct per segment
            assert model.fc1.n_segments == 4 and model.fc1.centroids.shape == (4, 8, 4)
            for seg in q.reshape(q.shape[0], -1, 4).transpose(0, 1):
                assert torch.unique(seg, dim=0).shape[0] <= 8
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
    # every layer incl. the 4-row head (per-segment K clamped to 1 there)
    cb = VectorQuantizationCallback("pq", **KW, start_epoch=1, clamp_centroids=True)
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


def _brute_force_segments(w, bs, k):
    """Per column segment, the globally optimal k-means partition of the segment's rows by
    enumerating every labelling (k = 2), and the reconstructed weight (cluster means)."""
    import itertools

    out = torch.empty_like(w)
    for s in range(w.shape[1] // bs):
        x = w[:, s * bs:(s + 1) * bs].double()
        best = None
        for lab in itertools.product(range(k), repeat=x.shape[0]):
            lab = torch.tensor(lab)
            if len(set(lab.tolist())) < k:
                continue
            means = torch.stack([x[lab == j].mean(0) for j in range(k)])
            sse = float(((x - means[lab]) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, means[lab])
        out[:, s * bs:(s + 1) * bs] = best[1].to(w.dtype)
    return out


def test_pq_one_codebook_per_segment_equals_brute_force():
    """Gong et al. 2014 sec. 3.3: every column segment has its own k-means codebook."""
    g = torch.Generator().manual_seed(3)
    m, bs, k, n_seg = 7, 2, 2, 4
    w = torch.empty(m, bs * n_seg)
    for s in range(n_seg):  # two tight clusters per segment, different in every segment
        centers = 3 * torch.randn(2, bs, generator=g)
        lab = torch.tensor([0, 1] + torch.randint(0, 2, (m - 2,), generator=g).tolist())
        w[:, s * bs:(s + 1) * bs] = centers[lab] + 0.01 * torch.randn(m, bs, generator=g)
    model = nn.Sequential(nn.Linear(bs * n_seg, m))
    with torch.no_grad():
        model[0].weight.copy_(w)
    cb = VectorQuantizationCallback("pq", n_centroids=k, block_size=bs, n_iter=20)
    cb.setup(None, model)
    cb.apply(model)
    layer = model[0]
    assert layer.centroids.shape == (n_seg, k, bs) and layer.n_segments == n_seg
    ref = _brute_force_segments(w, bs, k)
    torch.testing.assert_close(layer.weight, ref, rtol=0, atol=4e-3)  # fp16 centroids
    x = torch.randn(5, bs * n_seg, generator=g)
    torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias))
    # size by hand: m * S * log2(K) index bits + S fp16 codebooks of K x bs + fp32 bias
    assert layer.storage_bits() == m * n_seg * 1 + 16 * n_seg * k * bs + 32 * m
    from qtrain.quant.size import model_storage_bits

    assert model_storage_bits(model).total_bits == layer.storage_bits()
    # the shared codebook (named option; the pre-issue-11 default) cannot represent them
    shared = nn.Sequential(nn.Linear(bs * n_seg, m))
    with torch.no_grad():
        shared[0].weight.copy_(w)
    cb = VectorQuantizationCallback("pq", n_centroids=k, block_size=bs, n_iter=20,
                                    codebook="shared")
    cb.setup(None, shared)
    cb.apply(shared)
    assert shared[0].centroids.shape == (k, bs) and shared[0].n_segments == 1
    err_seg = float(((layer.weight - w) ** 2).sum())
    err_shared = float(((shared[0].weight - w) ** 2).sum())
    assert err_shared > 100 * err_seg
    with pytest.raises(ValueError, match="codebook='global'"):
        VectorQuantizationCallback("pq", codebook="global")


def test_pq_segments_conv_and_checkpoint_rebuild():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 12, 3), nn.ReLU())
    w = model[0].weight.detach().clone()  # (12, 18): two segments of 9 (whole 3x3 kernels)
    cb = VectorQuantizationCallback("pq", n_centroids=4, block_size=9, n_iter=10,
                                    types=("Conv2d",))
    cb.setup(None, model)
    cb.apply(model)
    conv = model[0]
    assert conv.centroids.shape == (2, 4, 9)
    flat = conv.weight.reshape(12, 18)
    for s in range(2):  # each segment: its rows at their nearest centroid of ITS codebook
        c = conv.centroids.detach()[s]
        seg = w.reshape(12, 18)[:, 9 * s:9 * (s + 1)]
        near = c[torch.cdist(seg, c).argmin(1)]
        torch.testing.assert_close(flat[:, 9 * s:9 * (s + 1)], near)
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(model(x), F.relu(F.conv2d(x, conv.weight, conv.bias)))
    # a checkpoint of the quantized model loads back into the float architecture
    fresh = nn.Sequential(nn.Conv2d(2, 12, 3), nn.ReLU())
    cb2 = VectorQuantizationCallback("pq", n_centroids=4, block_size=9, types=("Conv2d",))
    cb2.setup(None, fresh)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x)) and fresh[0].n_segments == 2
