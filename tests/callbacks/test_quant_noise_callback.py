"""Quant-Noise callback: conversion, float vs fully-quantized evaluation against references."""

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader, trainer


def _int8(w):
    return torch.fake_quantize_per_tensor_affine(w, float(w.abs().max()) / 127.5, 0, -128, 127)


def _reference_metrics(model, loader, quantize):
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in ["embed_tokens", "q_proj", "out_proj", "fc1", "fc2", "head"]:
            m = getattr(model, name)
            w = m.weight.detach()
            q = _int8(w) if quantize else w
            setattr(model, name, torch.nn.Embedding.from_pretrained(q) if name == "embed_tokens"
                    else torch.nn.Linear(w.shape[1], w.shape[0]))
            if name != "embed_tokens":
                getattr(model, name).weight.copy_(q)
                getattr(model, name).bias.copy_(m.bias)
        losses = [F.cross_entropy(model(x), y).item() for x, y in loader]
    return sum(losses) / len(losses)


def test_conversion_training_and_float_vs_quant_metrics():
    pl.seed_everything(0)
    model = TinyTransformerish()
    w_fc1 = model.fc1.weight
    cb = QuantNoiseCallback(p={"Linear": 0.2, "Embedding": 0.1}, block_size=8)
    val = token_loader(n=16, seed=1)  # 2 batches
    tr = trainer(max_epochs=1, callbacks=[cb], limit_val_batches=2)  # val after last step
    tr.fit(model, token_loader(), val)
    assert isinstance(model.fc1, QuantLinear) and model.fc1.weight is w_fc1  # shared param
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.fc1.weight_quantizer.p == 0.2 and model.embed_tokens.weight_quantizer.p == 0.1
    assert int(model.fc1.weight_quantizer.step) == 4  # one mask per training step
    seeds = {q.seed for q in cb.quantizers()}
    assert len(seeds) == len(cb.quantizers())  # every layer its own mask stream
    m = tr.callback_metrics
    for k in ("val_loss_float", "val_loss_quant", "val_acc_float", "val_acc_quant"):
        assert k in m
    ref_f = _reference_metrics(model, val, quantize=False)
    ref_q = _reference_metrics(model, val, quantize=True)
    assert float(m["val_loss_float"]) == pytest.approx(ref_f, rel=1e-5)
    assert float(m["val_loss_quant"]) == pytest.approx(ref_q, rel=1e-5)
    assert ref_f != ref_q
    assert all(q.eval_p == 0.0 for q in cb.quantizers())  # back to float after the comparison


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        QuantNoiseCallback(mode="int3")
    with pytest.raises(ValueError, match="nomatch"):
        trainer(max_steps=1, callbacks=[QuantNoiseCallback(include=["nomatch"])]).fit(
            TinyTransformerish(), token_loader())
    with pytest.raises(ValueError, match=r"fc1.*block_size=5"):
        cb = QuantNoiseCallback(include=["fc1"], block_size={"Linear": 5})
        trainer(max_steps=1, callbacks=[cb]).fit(TinyTransformerish(), token_loader())
