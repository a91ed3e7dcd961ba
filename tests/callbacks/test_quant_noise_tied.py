"""Quant-Noise on an LM with a tied embedding / output projection: one quantizer, one mask."""

from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.models.transformer_lm import TransformerLM
from qtrain.modules.language_model import CausalLM
from qtrain.quant.size import model_storage_bits
from tests.callbacks.tiny_lightning import trainer

VOCAB = 64


def _loader(n=16, seq=8, batch=4):
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(tok[:, :-1], tok[:, 1:]), batch_size=batch)


def test_tied_layers_share_one_quantizer_and_one_mask_per_step():
    pl.seed_everything(0)
    lm = TransformerLM(VOCAB, dropout=0.0, tiny=True)  # output projection tied to embedding
    assert lm.output_projection.weight is lm.embed_tokens.weight
    module = CausalLM(lm, optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9))
    cb = QuantNoiseCallback(p=0.5, block_size=8, mode="int8",
                            include=[r".*embed_tokens", r".*output_projection"])
    seen = []  # the noised weight of every quantizer call, in call order
    t = trainer(max_steps=3, callbacks=[cb], limit_val_batches=0)
    cb.setup(t, module, "fit")
    emb, out = lm.embed_tokens, lm.output_projection
    q = emb.weight_quantizer
    assert out.weight_quantizer is q and out.weight is emb.weight
    q.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    t.fit(module, _loader())
    assert len(seen) == 6 and int(q.step) == 3  # two uses per step, one mask draw per step
    for s in range(3):
        assert torch.equal(seen[2 * s], seen[2 * s + 1])  # both uses: the same noised weight
    assert not torch.equal(seen[0], seen[2])  # a new mask (and weight) each step
    # the tied weight (with its one quantization) is counted once
    rows = {r.name: r.bits for r in model_storage_bits(module).layers}
    assert rows["model.output_projection"] < 32 * 64  # at most its own tensors, not the table
