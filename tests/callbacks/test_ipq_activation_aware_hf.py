"""Activation-aware iPQ on a tiny HF BERT with dict batches: the k-means metric is the pooled
input covariance of the layer inputs (Stock et al. 2019, eq. (4)-(5) objective ||x(W - W_hat)||^2)."""

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from qtrain.callbacks import ipq as IPQ
from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.models.hf import HFSequenceClassifier, make_tiny_pretrained
from qtrain.modules.sequence_classification import SequenceClassifier
from qtrain.nn.pq_layers import PQLinear
from qtrain.quant import kmeans as KM
from tests.callbacks.tiny_lightning import trainer as make_trainer

LAYERS = ("model.hf.bert.encoder.layer.0.intermediate.dense",
          "model.hf.bert.encoder.layer.1.output.dense")


def _dict_loader(vocab: int, n=8, seq=7, batch=4):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(5, vocab, (seq,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - 1 - i % 3:] = 0  # some padding
        ids[mask == 0] = 0
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "token_type_ids": torch.zeros(seq, dtype=torch.long),
                     "labels": torch.tensor(i % 2)})
    return DataLoader(rows, batch_size=batch, shuffle=False)


def _hand_metric(x: torch.Tensor, bs: int) -> torch.Tensor:
    """sum over rows and blocks of x_block^T x_block, divided by the number of rows (loops)."""
    h = torch.zeros(bs, bs, dtype=torch.float64)
    for row in x.double():
        for j in range(0, row.numel(), bs):
            b = row[j:j + bs]
            h += torch.outer(b, b)
    return h / x.shape[0]


def test_activation_aware_metric_on_hf_dict_batches(tmp_path, monkeypatch):
    path = make_tiny_pretrained("bert", str(tmp_path / "bert"), seed=0)
    pl.seed_everything(0)
    module = SequenceClassifier(HFSequenceClassifier(path, num_labels=2),
                                optimizer=partial(torch.optim.SGD, lr=0.01))
    vocab = module.model.hf.config.vocab_size
    loader = _dict_loader(vocab)

    # reference: the layers' inputs on the first batch, hooked on an untouched copy (eval)
    ref_model = copy.deepcopy(module).eval()
    hooked = {}
    for name in LAYERS:
        ref_model.get_submodule(name).register_forward_pre_hook(
            lambda m, inp, name=name: hooked.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1])))
    first = next(iter(loader))
    with torch.no_grad():
        ref_model({k: v for k, v in first.items() if k != "labels"})

    used = []
    real_kmeans = KM.kmeans

    def spy(x, *a, metric=None, name="kmeans", **kw):
        used.append((name, metric))
        return real_kmeans(x, *a, metric=metric, name=name, **kw)

    monkeypatch.setattr(KM, "kmeans", spy)
    cb = IterativePQCallback(stages=[[r".*layer\.0\.intermediate\.dense",
                                      r".*layer\.1\.output\.dense"]],
                             n_centroids=8, n_iter=2, unit="step", boundaries=[0],
                             activation_aware=True)
    make_trainer(max_steps=1, callbacks=[cb]).fit(module, loader)

    assert sorted(n for n, _ in used) == sorted(LAYERS)
    for name, metric in used:
        layer = module.get_submodule(name)
        assert isinstance(layer, PQLinear) and layer.block_size == 8
        x = hooked[name]
        assert x.shape[0] == 4 * 7  # every token of the batch (padding included)
        torch.testing.assert_close(metric.double(), _hand_metric(x, 8), rtol=1e-5, atol=1e-6)


class _KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.seen = None

    def forward(self, input_ids=None, attention_mask=None, x=None):
        self.seen = (input_ids, attention_mask, x)
        return self.lin(torch.ones(1, 4))


@pytest.mark.parametrize("kind", ["dict", "tuple", "tensor"])
def test_default_forward_batch_kinds(kind):
    m = _KwargsModel()
    ids, mask = torch.arange(3), torch.ones(3)
    if kind == "dict":  # HF convention: model(**batch) without labels
        IPQ._default_forward(m, {"input_ids": ids, "attention_mask": mask, "labels": ids})
        assert m.seen[0] is ids and m.seen[1] is mask
    elif kind == "tuple":
        IPQ._default_forward(m, (ids, mask))
        assert m.seen[0] is ids and m.seen[1] is None
    else:
        IPQ._default_forward(m, ids)
        assert m.seen[0] is ids
