"""iPQ runs that end before the last stage (issue 11 item 7), with a real pl.Trainer:
the stages not reached are quantized at the end of fit (default) or refused before training
(on_incomplete='error'). Never a model left partly in float."""

import pytest
import pytorch_lightning as pl
import torch

from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.errors import ConfigError
from qtrain.nn.pq_layers import PQEmbedding, PQLinear, is_pq
from qtrain.quant import kmeans as KM
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader
from tests.callbacks.tiny_lightning import trainer as make_trainer

QUANTIZED = ("fc1", "fc2", "embed_tokens", "q_proj", "out_proj")


def _ipq(**kw):
    base = dict(stages="fairseq_transformer", n_centroids=16, n_iter=5, unit="step",
                boundaries=[2, 5, 9])
    base.update(kw)
    return IterativePQCallback(**base)


class _FloatAtEnd(pl.Callback):
    """Float weights of the attention layers when training ends (before iPQ's end hook)."""

    def __init__(self):
        self.w, self.batches = {}, 0

    def on_train_batch_start(self, *args):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        for n in ("q_proj", "out_proj"):
            m = pl_module.get_submodule(n)
            if not is_pq(m):
                self.w[n] = m.weight.detach().clone()


def test_stages_not_reached_are_quantized_at_end_of_fit():
    pl.seed_everything(0)
    model = TinyTransformerish()
    probe, cb = _FloatAtEnd(), _ipq()
    make_trainer(max_steps=7, callbacks=[probe, cb]).fit(model, token_loader())  # stage 2 at 9
    assert probe.batches == 7 and cb.stage == 3
    for n in QUANTIZED:
        assert is_pq(model.get_submodule(n)), n
    assert isinstance(model.embed_tokens, PQEmbedding) and not is_pq(model.head)
    # the attention stage was fitted on the final float weights: k-means with the stage's seed
    # (seed + 1000 * stage + index in the group), block 4 (attention), no finetuning after
    assert set(probe.w) == {"q_proj", "out_proj"}
    for i, n in enumerate(("q_proj", "out_proj")):
        m = model.get_submodule(n)
        assert isinstance(m, PQLinear) and m.block_size == 4
        ref = KM.pq_fit(probe.w[n], 4, 16, 5, seed=0 + 1000 * 2 + i, name=n)
        assert torch.equal(m.centroids.detach(), ref.centroids)
        assert torch.equal(m.assignments, ref.assignments)
        # independent check: every block holds its nearest centroid (brute force)
        blocks = probe.w[n].reshape(-1, 4)
        d = ((blocks[:, None, :] - m.centroids.detach()[None]) ** 2).sum(-1)
        assert torch.equal(d.gather(1, m.assignments[:, None]).squeeze(1), d.min(1).values)
    # the evaluated model is the quantized one
    x = torch.randint(0, 64, (3, 6))
    model.eval()
    h = torch.nn.functional.embedding(x, model.embed_tokens.weight_from_codebook())
    wq, wo = model.q_proj.weight_from_codebook(), model.out_proj.weight_from_codebook()
    h = h + torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(
        h, wq, model.q_proj.bias)), wo, model.out_proj.bias)
    assert torch.allclose(model.out_proj(torch.tanh(model.q_proj(
        model.embed_tokens(x)))) + model.embed_tokens(x), h)


def test_on_incomplete_error_refuses_before_training():
    pl.seed_everything(0)
    model = TinyTransformerish()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = _FloatAtEnd()
    with pytest.raises(ConfigError, match=r"stages \[2\] start at steps \[9\].*last step is 6"):
        make_trainer(max_steps=7, callbacks=[probe, _ipq(on_incomplete="error")]).fit(
            model, token_loader())
    assert probe.batches == 0 and not any(is_pq(m) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_on_incomplete_error_epoch_unit_bounded_by_max_steps():
    # 4 batches per epoch; max_steps=6 ends inside epoch 1: a stage at epoch 2 cannot run
    cb = _ipq(unit="epoch", boundaries=[0, 1, 2], on_incomplete="error")
    with pytest.raises(ConfigError, match=r"stages \[2\] start at epochs \[2\].*last epoch is 1"):
        make_trainer(max_epochs=10, max_steps=6, callbacks=[cb]).fit(
            TinyTransformerish(), token_loader())
    # the same schedule with room for it runs (no false alarm) and applies every stage
    model, cb = TinyTransformerish(), _ipq(unit="epoch", boundaries=[0, 1, 2],
                                           on_incomplete="error")
    make_trainer(max_epochs=3, callbacks=[cb]).fit(model, token_loader())
    assert cb.stage == 3 and all(is_pq(model.get_submodule(n)) for n in QUANTIZED)


def test_on_incomplete_bad_value():
    with pytest.raises(ConfigError, match=r"ipq.on_incomplete='skip'.*'quantize', 'error'"):
        _ipq(on_incomplete="skip")
