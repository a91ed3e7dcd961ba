"""iPQ keeps an LM's tied embedding / output projection tied; tied weights count once in size."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.models.transformer_lm import TransformerLM
from qtrain.modules.language_model import CausalLM
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.pq_layers import PQEmbedding, PQLinear, rebuild_pq_layers
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant.size import model_storage_bits
from tests.callbacks.tiny_lightning import trainer as make_trainer

VOCAB = 64


def _lm():
    return TransformerLM(VOCAB, dropout=0.0, tiny=True)  # dim 32, tied output projection


def _loader(n=16, seq=8, batch=4):
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(tok[:, :-1], tok[:, 1:]), batch_size=batch)


@pytest.fixture(scope="module")
def ipq_run():
    pl.seed_everything(0)
    module = CausalLM(_lm(), optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9))
    # output_projection is also named in a later stage: already quantized by the tie -> skipped
    cb = IterativePQCallback(stages=[[r".*embed_tokens"], [r".*fc1"], [r".*output_projection"]],
                             n_centroids=16, n_iter=3, unit="step", boundaries=[1, 2, 3])
    make_trainer(max_steps=5, callbacks=[cb]).fit(module, _loader())
    return module, cb


def test_ipq_keeps_tie_and_trains_shared_centroids(ipq_run):
    module, cb = ipq_run
    lm = module.model
    emb, out = lm.embed_tokens, lm.output_projection
    assert isinstance(emb, PQEmbedding) and isinstance(out, PQLinear)
    assert out.centroids is emb.centroids and out.assignments is emb.assignments
    assert torch.equal(out.weight, emb.weight_from_codebook())
    assert cb.codebooks["model.output_projection"]["tied_to"] == "model.embed_tokens"
    # the shared centroids were finetuned after the fit (and stayed shared)
    assert not torch.equal(emb.centroids.detach(), cb.codebooks["model.embed_tokens"]["centroids"])
    opt_params = [p for g in module.trainer.optimizers[0].param_groups for p in g["params"]]
    assert sum(p is emb.centroids for p in opt_params) == 1


def test_gradient_reaches_shared_centroids_from_both_uses(ipq_run):
    module, _ = ipq_run
    lm = module.model
    emb, out = lm.embed_tokens, lm.output_projection
    idx = torch.randint(0, VOCAB, (3, 5))
    h = torch.randn(7, 32)
    c = emb.centroids
    # output use alone, against an independent reference: dL/dW of the float weight, then the
    # mean over each centroid's blocks (Stock 2019 sec. 3.3)
    w = out.weight.detach().clone().requires_grad_(True)
    nn.functional.linear(h, w).pow(2).sum().backward()
    blocks = w.grad.reshape(-1, out.block_size)
    ref = torch.zeros_like(c).index_add_(0, out.assignments, blocks)
    ref /= torch.bincount(out.assignments, minlength=c.shape[0]).clamp_min(1)[:, None]
    c.grad = None
    out(h).pow(2).sum().backward()
    g_out = c.grad.clone()
    torch.testing.assert_close(g_out, ref)
    c.grad = None
    emb(idx).pow(2).sum().backward()
    g_emb = c.grad.clone()
    assert g_out.abs().sum() > 0 and g_emb.abs().sum() > 0
    c.grad = None
    (out(h).pow(2).sum() + emb(idx).pow(2).sum()).backward()
    torch.testing.assert_close(c.grad, g_out + g_emb)


def test_tied_size_counted_once_and_rebuild_keeps_tie(ipq_run):
    module, cb = ipq_run
    lm = module.model
    emb = lm.embed_tokens
    fc1s = [b.fc1 for b in lm.layers]
    pq_bits = emb.storage_bits() + sum(f.storage_bits() for f in fc1s)
    pq_ids = {id(t) for m in [emb, lm.output_projection, *fc1s]
              for t in [*m.parameters(), *m.buffers()]}
    rest = {id(t): t for t in [*lm.parameters(), *lm.buffers()] if id(t) not in pq_ids}
    expected = pq_bits + sum(32 * t.numel() for t in rest.values())
    report = model_storage_bits(lm)
    assert report.total_bits == expected
    rows = {r.name: r for r in report.layers}
    assert rows["output_projection"].bits == 0 and "tied" in rows["output_projection"].kind
    assert cb.storage_bits(module) == pq_bits

    # a checkpoint loads back into the float (tied) architecture with the tie rebuilt
    sd = lm.state_dict()
    fresh = _lm()
    rebuilt = rebuild_pq_layers(fresh, sd)
    assert set(rebuilt) >= {"embed_tokens", "output_projection"}
    fresh.load_state_dict(sd)
    assert fresh.output_projection.centroids is fresh.embed_tokens.centroids
    tok = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(fresh.eval()(tok), lm.eval()(tok))


def test_untied_saved_codebooks_stay_separate():
    lm = _lm()
    emb = PQEmbedding.from_float(lm.embed_tokens, block_size=8, n_centroids=16, n_iter=2)
    sd = {"embed_tokens.centroids": emb.centroids.detach(),
          "embed_tokens.assignments": emb.assignments,
          "output_projection.centroids": emb.centroids.detach() + 1.0,
          "output_projection.assignments": emb.assignments}
    fresh = _lm()
    rebuild_pq_layers(fresh, sd)
    assert fresh.output_projection.centroids is not fresh.embed_tokens.centroids


def test_quant_noise_tied_weight_counted_once():
    lm = _lm()
    w_bits = QuantNoiseQuantizer(mode="int8").storage_bits(lm.embed_tokens.weight)
    lm.embed_tokens = QuantEmbedding.from_float(lm.embed_tokens, QuantNoiseQuantizer(mode="int8"))
    lm.output_projection = QuantLinear.from_float(lm.output_projection,
                                                  QuantNoiseQuantizer(mode="int8"))
    assert lm.output_projection.weight is lm.embed_tokens.weight
    rows = {r.name: r.bits for r in model_storage_bits(lm).layers}
    assert rows["embed_tokens"] == w_bits and rows["output_projection"] == 0
    # a different quantization of the same float Parameter is a second stored tensor
    lm.output_projection.weight_quantizer = QuantNoiseQuantizer(mode="int4")
    rows = {r.name: r.bits for r in model_storage_bits(lm).layers}
    assert rows["output_projection"] == QuantNoiseQuantizer(mode="int4").storage_bits(
        lm.embed_tokens.weight)


class _TinyHFMaskedLM(pl.LightningModule):
    """HF BertForMaskedLM (tie_word_embeddings=True: decoder.weight is the word embedding)."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=16, tie_word_embeddings=True)
        torch.manual_seed(0)
        self.hf = BertForMaskedLM(cfg)

    def forward(self, input_ids):
        return self.hf(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_hf_tie_word_embeddings_kept():
    pl.seed_everything(0)
    module = _TinyHFMaskedLM()
    dec = module.hf.cls.predictions.decoder
    assert dec.weight is module.hf.bert.embeddings.word_embeddings.weight
    cb = IterativePQCallback(stages=[[r".*word_embeddings"]], n_centroids=16, n_iter=2,
                             unit="step", boundaries=[1])
    make_trainer(max_steps=3, callbacks=[cb]).fit(module, _loader())
    emb, dec = module.hf.bert.embeddings.word_embeddings, module.hf.cls.predictions.decoder
    assert isinstance(emb, PQEmbedding) and isinstance(dec, PQLinear)
    assert dec.centroids is emb.centroids and torch.equal(dec.weight, emb.weight_from_codebook())
    assert dec.bias is not None  # the decoder keeps its own bias
    rows = {r.name: r.bits for r in model_storage_bits(module).layers}
    assert rows["hf.cls.predictions.decoder"] == 0  # bias is shared with predictions.bias
