"""Quant-Noise training followed by iPQ in one run (the recipes' composition: quant=quant_noise
plus extra_callbacks.ipq), with a real Trainer on a tiny fairseq-named model.

Checks against independent references: each PQ layer is fitted from the *float* weight of
the Quant-Noise layer it replaces (k-means recomputed on that weight; a fit on the int8
value differs), noise stays active on the not-yet-quantized layers until their stage, the
optimizer holds exactly the live trainable parameters, float and fully-quantized evaluations
coincide once no noised layer is left, and the compressed state dict loads back into a fresh
model with the same outputs.
"""

import pytorch_lightning as pl
import torch

import qtrain.callbacks.ipq as ipq_mod
from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.pq_layers import PQEmbedding, PQLinear, is_pq
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant import kmeans as KM
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader, trainer

NOISED = ["embed_tokens", "q_proj", "out_proj", "fc1", "fc2"]
STAGES = [["fc1", "fc2"], ["embed_tokens"], ["q_proj", "out_proj"]]
K, N_ITER = 8, 6


class _Recorder(pl.Callback):
    def __init__(self):
        self.val = []

    def on_validation_end(self, trainer, pl_module):
        self.val.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _callbacks():
    qn = QuantNoiseCallback(p=0.5, block_size=8, mode="int8", include=NOISED,
                            types=["Linear", "Embedding"], seed=3)
    ipq = IterativePQCallback(stages=STAGES, n_centroids=K, n_iter=N_ITER,
                              block_sizes={"attention": 4}, start=1, stage_length=1,
                              unit="epoch", seed=11)
    return qn, ipq


def test_quant_noise_then_ipq_fits_from_float_weight_and_composes(monkeypatch):
    torch.manual_seed(0)
    model = TinyTransformerish()
    float_params = {n: model.get_submodule(n).weight for n in NOISED}
    qn, ipq = _callbacks()
    fits = {}
    real_pq_class_for = ipq_mod.pq_class_for

    def spy_pq_class_for(m):  # record what iPQ fits from, then fit for real
        cls = real_pq_class_for(m)

        class Spy:
            @staticmethod
            def from_float(module, bs, k, n_iter, seed, samples, name):
                fits[name] = {"type": type(module), "weight": module.weight,
                              "snapshot": module.weight.detach().clone(),
                              "int8": module.weight_quantizer.quantized_value(module.weight),
                              "noise_step": int(module.weight_quantizer.step),
                              "step": tr.global_step, "bs": bs, "seed": seed}
                return cls.from_float(module, bs, k, n_iter, seed, samples, name=name)
        return Spy

    monkeypatch.setattr(ipq_mod, "pq_class_for", spy_pq_class_for)
    rec = _Recorder()
    tr = trainer(max_epochs=4, callbacks=[qn, ipq, rec])
    tr.fit(model, token_loader(), token_loader(seed=1))

    # stages at epoch boundaries 1, 2, 3 (4 steps per epoch), FFN -> embeddings -> attention
    assert {n: f["step"] for n, f in fits.items()} == {
        "fc1": 4, "fc2": 4, "embed_tokens": 8, "q_proj": 12, "out_proj": 12}
    for name, f in fits.items():
        # iPQ replaced the Quant-Noise layer and fitted from its float master weight
        assert f["type"] in (QuantLinear, QuantEmbedding)
        assert f["weight"] is float_params[name]
        # the noise ran on this layer in every training step until its stage (the stage's
        # own batch had started, and advanced the noise step, when iPQ replaced the layer)
        assert f["noise_step"] == f["step"] + 1
        ref = KM.pq_fit(f["snapshot"], f["bs"], K, N_ITER, f["seed"], name=name)
        pq = model.get_submodule(name)
        assert isinstance(pq, PQEmbedding if name == "embed_tokens" else PQLinear)
        assert torch.equal(pq.assignments, ref.assignments)
        on_int8 = KM.pq_fit(f["int8"], f["bs"], K, N_ITER, f["seed"], name=name)
        assert not torch.allclose(ref.centroids, on_int8.centroids)
    assert fits["q_proj"]["bs"] == 4 and fits["fc1"]["bs"] == 8

    # no Quant-Noise quantizer is left; the head was never touched
    assert not any(isinstance(m, QuantNoiseQuantizer) for m in model.modules())
    assert type(model.head) is torch.nn.Linear and not is_pq(model.head)
    # the optimizer holds exactly the live trainable parameters (no replaced float weight)
    opt_ids = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert not opt_ids & {id(p) for p in float_params.values()}

    # float vs quantized evaluation: differ while noised layers exist, equal once all are PQ
    first, last = rec.val[0], rec.val[-1]
    assert first["val_acc_float"] == first["val_acc"]  # validation itself runs the float model
    assert last["val_loss_float"] == last["val_loss_quant"]
    assert first["val_loss_float"] != first["val_loss_quant"]
    # the run summary's float metric is the last validation before any layer was replaced
    assert qn.fp32_metric == first["val_acc"]

    # the compressed state dict loads back into a fresh model (PQ layers rebuilt) exactly
    fresh = TinyTransformerish()
    qn2, ipq2 = _callbacks()
    qn2.setup(None, fresh)
    ipq2.setup(None, fresh)
    fresh.load_state_dict(model.state_dict())
    assert all(is_pq(fresh.get_submodule(n)) for n in NOISED)
    x = next(iter(token_loader(seed=2)))[0]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
