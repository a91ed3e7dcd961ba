"""Quant-Noise callback: conversion, float vs fully-quantized evaluation against references
(numpy min-max weights, PyTorch's fake-quant op on the outputs), and a new random subset and
PQ refits every training step whatever the optimizer (fused / foreach / plain)."""

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.quant_noise import OutputQuantNoise
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader, trainer

LAYERS = ["embed_tokens", "q_proj", "out_proj", "fc1", "fc2", "head"]


def _np_int8(w):
    """Paper sec. 3.1 by hand (numpy, float32 like the model): s = (max - min) / 255,
    z = round(-min / s), (clamp(round(w / s) + z, 0, 255) - z) * s."""
    w = w.numpy()
    lo, hi = np.float32(min(w.min(), 0)), np.float32(max(w.max(), 0))
    s = np.float32((hi - lo) / np.float32(255))
    z = np.round(-lo / s)
    codes = np.clip(np.round(w * (np.float32(1) / s)) + z, 0, 255)
    return torch.from_numpy(((codes - z) * s).astype(np.float32))


def _reference_loss(model, loader, quantize, act_ranges):
    """Plain torch layers; quantized: numpy int8 weights and each layer's output through
    PyTorch's per-tensor fake-quant op with that layer's stored range."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in LAYERS:
            m = getattr(model, name)
            w = m.weight.detach()
            q = _np_int8(w) if quantize else w
            if name == "embed_tokens":
                new = torch.nn.Embedding.from_pretrained(q)
            else:
                new = torch.nn.Linear(w.shape[1], w.shape[0])
                new.weight.copy_(q)
                new.bias.copy_(m.bias)
            if quantize:
                s, z = act_ranges[name]
                new.register_forward_hook(lambda mod, i, o, s=s, z=z:
                                          torch.fake_quantize_per_tensor_affine(o, s, z, 0, 255))
            setattr(model, name, new)
        losses = [F.cross_entropy(model(x), y).item() for x, y in loader]
    return sum(losses) / len(losses)


def test_conversion_training_and_float_vs_quant_metrics():
    pl.seed_everything(0)
    model = TinyTransformerish()
    w_fc1 = model.fc1.weight
    cb = QuantNoiseCallback(p={"Linear": 0.2, "Embedding": 0.1}, mode="int8")
    val = token_loader(n=16, seed=1)  # 2 batches
    tr = trainer(max_epochs=1, callbacks=[cb], limit_val_batches=2)  # val after last step
    tr.fit(model, token_loader(), val)
    assert isinstance(model.fc1, QuantLinear) and model.fc1.weight is w_fc1  # shared param
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.fc1.weight_quantizer.p == 0.2 and model.embed_tokens.weight_quantizer.p == 0.1
    assert int(model.fc1.weight_quantizer.step) == 4  # one mask per training step
    seeds = {q.seed for q in cb.quantizers()}
    assert len(seeds) == len(cb.quantizers())  # every layer its own mask stream
    # every noised layer's output is quantized (fairseq's scalar path), range fitted at step 1
    outs = {n: getattr(model, n).output_quantizer for n in LAYERS}
    assert all(isinstance(o, OutputQuantNoise) and int(o.fitted_at) == 1 for o in outs.values())
    ranges = {n: (float(o.scale), int(o.zero_point)) for n, o in outs.items()}
    m = tr.callback_metrics
    for k in ("val_loss_float", "val_loss_quant", "val_acc_float", "val_acc_quant"):
        assert k in m
    ref_f = _reference_loss(model, val, False, ranges)
    ref_q = _reference_loss(model, val, True, ranges)
    assert float(m["val_loss_float"]) == pytest.approx(ref_f, rel=1e-5)
    assert float(m["val_loss_quant"]) == pytest.approx(ref_q, rel=1e-5)
    assert float(m["val_loss"]) == pytest.approx(ref_f, rel=1e-5)  # validation runs float
    assert ref_f != ref_q
    assert all(q.eval_p == 0.0 for q in cb.quantizers() + cb.output_quantizers())


def test_activations_float_option():
    pl.seed_everything(0)
    model = TinyTransformerish()
    cb = QuantNoiseCallback(p=0.2, mode="int4", quantize_activations=False, include=["fc1"])
    trainer(max_steps=1, callbacks=[cb], limit_val_batches=0).fit(model, token_loader())
    assert not hasattr(model.fc1, "output_quantizer") and cb.output_quantizers() == []
    model.eval()
    cb.set_eval_p(1.0)
    x = torch.randn(3, 16)
    ref = F.linear(x, model.fc1.weight_quantizer.quantized_value(model.fc1.weight),
                   model.fc1.bias)
    assert torch.equal(model.fc1(x), ref)  # weights quantized, output float


class _OptModel(TinyTransformerish):
    def __init__(self, opt: str):
        super().__init__()
        self.opt = opt

    def configure_optimizers(self):
        kw = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "plain": {"foreach": False}}[self.opt]
        return torch.optim.Adam(self.parameters(), lr=1e-2, **kw)


class _Record(pl.Callback):
    """The noised fc1 weight of every training step and the codebook after it."""

    def __init__(self):
        self.noised, self.fitted_at, self.centroids = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fc1 = pl_module.fc1
        q = fc1.weight_quantizer
        self.fitted_at.append(int(q.fitted_at))
        self.centroids.append(q.centroids.clone())

    def on_before_backward(self, trainer, pl_module, loss):
        fc1 = pl_module.fc1
        with torch.no_grad():
            w = fc1.weight.detach()
            self.noised.append((fc1.quantized_weight() != w).reshape(-1, 8).all(-1))


@pytest.mark.parametrize("opt", ["fused", "foreach", "plain"])
def test_new_mask_every_step_and_pq_refits_with_every_optimizer(opt):
    pl.seed_everything(0)
    model = _OptModel(opt)
    cb = QuantNoiseCallback(p=0.5, block_size=8, mode="pq", bits=2, pq_refresh=2,
                            include=["fc1", "fc2"], types=["Linear"])
    rec = _Record()
    trainer(max_steps=6, callbacks=[cb, rec], limit_val_batches=0).fit(
        model, token_loader(n=48))
    masks = rec.noised
    assert len(masks) == 6
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(5))  # new subset
    assert rec.fitted_at == [1, 1, 3, 3, 5, 5]  # refitted every pq_refresh = 2 steps
    assert not torch.equal(rec.centroids[1], rec.centroids[2])  # on the updated weight
    assert int(model.fc1.weight_quantizer.step) == 6


def test_bad_config():
    with pytest.raises(ConfigError, match="mode"):
        QuantNoiseCallback(mode="int3")
    with pytest.raises(ConfigError, match="act_p"):
        QuantNoiseCallback(mode="int8", act_p=2.0)
    with pytest.raises(ValueError, match="nomatch"):
        trainer(max_steps=1, callbacks=[QuantNoiseCallback(include=["nomatch"])]).fit(
            TinyTransformerish(), token_loader())
    with pytest.raises(ConfigError, match=r"fc1.*block_size=5"):
        cb = QuantNoiseCallback(include=["fc1"], block_size={"Linear": 5}, mode="pq")
        trainer(max_steps=1, callbacks=[cb]).fit(TinyTransformerish(), token_loader())
