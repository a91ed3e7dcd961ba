"""Quant-Noise's extra float / fully-quantized evaluations aggregate over all evaluated
batches as the trainer's own validation does: perplexity = exp(sum of token NLLs / number of
tokens) (worked here in numpy, float64), accuracy = correct / samples -- not the mean of
per-batch values, which the test data make clearly different (batches of unequal size and
difficulty)."""

from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.errors import ConfigError
from qtrain.models.transformer_lm import TransformerLM
from qtrain.modules.classification import ImageClassifier
from qtrain.modules.language_model import CausalLM
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader, trainer

VOCAB, SEQ = 64, 8


def _shift_data(n, seed, random_tail=0):
    """Sequences following next = (token + 1) mod VOCAB (learnable), the last
    ``random_tail`` ones random (hard): batches of very different perplexity."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    tok = (start + torch.arange(SEQ + 1)) % VOCAB
    if random_tail:
        tok[-random_tail:] = torch.randint(0, VOCAB, (random_tail, SEQ + 1), generator=g)
    return TensorDataset(tok[:, :-1], tok[:, 1:])


def _token_nll_np(module, loader):
    """Every target token's NLL by hand: logsumexp(logits) - logit[target], float64 numpy."""
    out = []
    with torch.no_grad():
        for x, y in loader:
            z = module(x).double().numpy().reshape(-1, VOCAB)
            m = z.max(1, keepdims=True)
            lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
            out.append(lse - z[np.arange(len(z)), y.numpy().reshape(-1)])
    return out  # one array per batch


def test_lm_float_and_quant_ppl_are_exp_of_the_token_mean_nll():
    pl.seed_everything(0)
    lm = TransformerLM(VOCAB, dropout=0.0, tiny=True)
    module = CausalLM(lm, optimizer=partial(torch.optim.Adam, lr=3e-2))
    cb = QuantNoiseCallback(p=0.1, mode="int4")
    val = DataLoader(_shift_data(10, seed=1, random_tail=2), batch_size=4)  # 4, 4, 2 sequences
    t = trainer(max_epochs=4, callbacks=[cb], check_val_every_n_epoch=4)  # val after step 32
    t.fit(module, DataLoader(_shift_data(64, seed=0), batch_size=8, shuffle=False), val)
    assert t.global_step == 32
    m = t.callback_metrics
    module.eval()
    for tag, p in (("float", 0.0), ("quant", 1.0)):
        cb.set_eval_p(p)
        nll = _token_nll_np(module, val)
        cb.set_eval_p(0.0)
        want = np.exp(np.concatenate(nll).sum() / sum(len(b) for b in nll))
        per_batch = np.mean([np.exp(b.mean()) for b in nll])  # the old aggregation
        assert abs(per_batch - want) / want > 0.05  # the data tell the two apart
        assert float(m[f"val_ppl_{tag}"]) == pytest.approx(want, rel=1e-4)
        tokens_loss = np.concatenate(nll).mean()
        assert float(m[f"val_loss_{tag}"]) == pytest.approx(tokens_loss, rel=1e-4)
    assert float(m["val_ppl"]) == pytest.approx(float(m["val_ppl_float"]), rel=1e-5)
    assert float(m["val_ppl_quant"]) != pytest.approx(float(m["val_ppl_float"]), rel=1e-4)


def test_classification_float_metrics_over_all_samples():
    """Task module (torchmetrics accuracy) and a plain (x, y) module: loss = CE over all
    samples / samples, acc = correct / samples, with batches of 4, 4 and 2 samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g)
    x[8:] *= 20  # the short last batch: large logits, large loss
    y = torch.randint(0, 3, (10,), generator=g)
    val = DataLoader(TensorDataset(x, y), batch_size=4)
    for module in (ImageClassifier(nn.Linear(6, 3), num_classes=3,
                                   optimizer=partial(torch.optim.SGD, lr=0.0)),
                   _PlainLinear()):
        cb = QuantNoiseCallback(p=0.1, mode="int8", quantize_activations=False)
        t = trainer(max_steps=1, callbacks=[cb])
        t.fit(module, DataLoader(TensorDataset(x, y), batch_size=10), val)
        m = t.callback_metrics
        module.eval()  # eval_p = 0: the float weights
        with torch.no_grad():
            logits = module(x).double().numpy()
        z = logits - logits.max(1, keepdims=True)
        nll = np.log(np.exp(z).sum(1)) - z[np.arange(10), y.numpy()]
        per_batch = np.mean([nll[:4].mean(), nll[4:8].mean(), nll[8:].mean()])
        assert abs(per_batch - nll.mean()) > 1e-2
        assert float(m["val_loss_float"]) == pytest.approx(nll.mean(), rel=1e-5)
        correct = logits.argmax(1) == y.numpy()
        assert float(m["val_acc_float"]) == pytest.approx(correct.mean(), abs=1e-7)


class _PlainLinear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_metric_fn_must_return_an_accumulator():
    cb = QuantNoiseCallback(p=0.1, mode="int8", metric_fn=lambda module, batch=None: {"loss": 0})
    t = trainer(max_steps=1, callbacks=[cb], limit_val_batches=1)
    with pytest.raises(ConfigError, match="metric_fn"):
        t.fit(TinyTransformerish(), token_loader(n=8), token_loader(n=8))
