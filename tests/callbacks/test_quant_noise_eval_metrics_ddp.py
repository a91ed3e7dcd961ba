"""2 CPU processes (gloo): Quant-Noise's val_ppl_float / val_ppl_quant are exp of the token
mean NLL over *both* ranks' shards (torchmetrics' compute() reduces the sums and counts), on
both ranks -- not each rank's own shard, nor a mean of the two ranks' perplexities."""

import copy
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.models.transformer_lm import TransformerLM
from qtrain.modules.language_model import CausalLM

VOCAB, SEQ = 64, 8


class _Dump(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_validation_end(self, trainer, pl_module):
        torch.save({k: float(v) for k, v in trainer.callback_metrics.items()},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def _data():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (12, SEQ + 1), generator=g)
    tok[1::2] = (tok[1::2, :1] + torch.arange(SEQ + 1)) % VOCAB  # rank 1's shard: a pattern
    return TensorDataset(tok[:, :-1], tok[:, 1:])


def _nll(module, ds):
    """Token NLLs by hand (float64 numpy logsumexp) over the whole data set."""
    with torch.no_grad():
        x, y = ds.tensors
        z = module(x).double().numpy().reshape(-1, VOCAB)
    m = z.max(1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(z - m).sum(1))) - z[np.arange(len(z)), y.numpy().reshape(-1)]


@pytest.mark.slow  # spawns 2 processes: ~1 min on the shared 2-core box (imports dominate)
def test_ppl_float_and_quant_are_global_token_means_on_both_ranks(tmp_path):
    pl.seed_everything(0)
    lm = TransformerLM(VOCAB, dropout=0.0, tiny=True)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-2)
    x, y = _data().tensors
    for _ in range(30):  # learn rank 1's pattern: the shards' perplexities differ clearly
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lm(x[1::2]).reshape(-1, VOCAB), y[1::2].reshape(-1)).backward()
        opt.step()
    module = CausalLM(lm, optimizer=partial(torch.optim.SGD, lr=0.0))
    kw = dict(p=0.1, mode="int8", quantize_activations=False)
    ref = copy.deepcopy(module)
    ds = _data()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[QuantNoiseCallback(**kw), _Dump(str(tmp_path))])
    trainer.validate(module, DataLoader(ds, batch_size=4, shuffle=False))  # 4 + 2 per rank
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    cb = QuantNoiseCallback(**kw)
    cb.setup(None, ref, "validate")
    ref.eval()
    for tag, p in (("float", 0.0), ("quant", 1.0)):
        cb.set_eval_p(p)
        nll = _nll(ref, ds).reshape(12, SEQ)
        want = np.exp(nll.mean())
        own0 = np.exp(nll[0::2].mean())
        two_means = (own0 + np.exp(nll[1::2].mean())) / 2
        assert abs(own0 - want) / want > 0.05 and abs(two_means - want) / want > 0.05
        for r in (r0, r1):
            assert r[f"val_ppl_{tag}"] == pytest.approx(want, rel=1e-4)
    assert r0["val_ppl"] == pytest.approx(r0["val_ppl_float"], rel=1e-5)
