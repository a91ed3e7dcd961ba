"""ELQ callback with a real pl.Trainer: the stage solution against a numpy reference built
from the captured weights and loss gradients, frozen weights on {alpha c}, the converted
layers, their storage and packed export."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from qtrain.callbacks.elq import ELQCallback
from qtrain.errors import ConfigError
from tests.callbacks.tiny_lightning import OptimizerIdentities, TinyCNN, image_loader, trainer

LAYERS = ("conv1", "conv2", "fc")


class _Capture(pl.Callback):
    """Before ELQ's hook: the float weights and loss gradients at the given steps."""

    def __init__(self, model, steps):
        self.model, self.steps, self.seen = model, steps, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            self.seen[trainer.global_step] = {
                n: (self.model.get_submodule(n).weight.detach().clone().double().numpy(),
                    self.model.get_submodule(n).weight.grad.detach().clone().double().numpy())
                for n in LAYERS}


class _Probe(pl.Callback):
    def __init__(self, elq):
        self.elq, self.history = elq, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({n: (self.elq.masks[n].clone(), m.weight.detach().clone())
                             for n, m in self.elq._layers.items() if n in self.elq.masks})


def _numpy_ternary(v):
    """Alternating optimisation written out: TWN start, then alpha <- sum c v / sum c^2,
    c <- sign(v) 1{|v| > alpha / 2} until the codes repeat."""
    a = np.abs(v)
    alpha = a[a > 0.7 * a.mean()].mean()
    c = np.sign(v) * (a > alpha / 2)
    while True:
        alpha = (c * v).sum() / (c * c).sum()
        new = np.sign(v) * (a > alpha / 2)
        if (new == c).all():
            return alpha, c
        c = new


def test_stage_solution_matches_numpy_reference_from_captured_gradients():
    pl.seed_everything(0)
    model = TinyCNN()
    lam = 0.05  # small enough that g / lam moves V visibly on this tiny problem
    elq = ELQCallback(kind="ternary", lam=lam, schedule=[0.5, 1.0], boundaries=[2, 4],
                      unit="step", convert_at_end=False)
    cap = _Capture(model, {2})
    trainer(max_steps=3, callbacks=[cap, elq]).fit(model, image_loader(n=32, batch=8))
    changed = 0
    for name in LAYERS:
        w, g = (x.reshape(-1) for x in cap.seen[2][name])
        k = round(0.5 * w.size)
        sel = np.argsort(-np.abs(w), kind="stable")[:k]
        mask = np.zeros(w.size, bool)
        mask[sel] = True
        assert (elq.masks[name].reshape(-1).numpy() == mask).all()  # largest |W| first
        alpha, c = _numpy_ternary(w[mask] - g[mask] / lam)
        assert elq.alpha[name] == pytest.approx(alpha, rel=1e-6)
        assert (elq.codes[name].reshape(-1).numpy()[mask] == c).all()
        changed += int((_numpy_ternary(w[mask])[1] != c).sum())  # codes without the gradient
    assert changed > 0  # the loss-gradient term changed some codes
    stage = [h for h in elq.history if h["stage"] == 1]
    assert len(stage) == 3 and all(h["approx_error"] > 0 for h in stage)


def test_quantized_weights_stay_on_alpha_codes_and_layers_convert(tmp_path):
    from qtrain.export import load_packed, pack_model, save_packed
    from qtrain.nn.elq_quantizer import ELQWeightQuantizer
    from qtrain.nn.fake_quant import is_fake_quant
    from qtrain.quant.size import model_storage_bits

    pl.seed_everything(0)
    model = TinyCNN(optim="adam")
    fp32_bits = model_storage_bits(model).total_bits
    bn_before = model.bn1.weight.detach().clone()
    elq = ELQCallback(kind="ternary", schedule=[0.5, 0.75, 1.0], boundaries=[0, 3, 6],
                      unit="step")
    probe = _Probe(elq)
    trainer(max_steps=9, callbacks=[elq, probe]).fit(model, image_loader(n=32, batch=8))
    assert not torch.equal(model.bn1.weight.detach(), bn_before)  # BN still trains
    prev = None
    for snap in probe.history:
        for name, (mask, w) in snap.items():
            vals = w[mask].abs().unique()
            assert len(vals[vals > 0]) == 1  # one alpha per layer
            if prev is not None and name in prev:
                pmask, pw = prev[name]
                assert (mask | ~pmask).all()  # masks only grow
                same_stage = int(mask.sum()) == int(pmask.sum())
                if same_stage:  # between stages the quantized values do not move
                    assert torch.equal(w[pmask], pw[pmask])
        prev = snap
    assert [round(float(s["fc"][0].float().mean()), 2) for s in probe.history][::3] == [0.5, 0.75, 1.0]
    (_, w0), (m2, w2) = probe.history[0]["conv1"], probe.history[2]["conv1"]
    assert not torch.equal(w0[~m2], w2[~m2])  # free weights trained
    n_w = 0
    for name in LAYERS:
        layer = model.get_submodule(name)
        assert is_fake_quant(layer) and isinstance(layer.weight_quantizer, ELQWeightQuantizer)
        w = layer.weight.detach()
        assert torch.equal(layer.weight_quantizer(w), w)  # already alpha * c, bit for bit
        assert set(torch.unique(w / elq.alpha[name]).round().tolist()) <= {-1.0, 0.0, 1.0}
        n_w += w.numel()
    saved = fp32_bits - model_storage_bits(model).total_bits
    assert saved == n_w * (32 - 2) - 3 * 32  # 2 bits per weight + one fp32 alpha per layer
    # packed export in the ternary format: same weights, same outputs after a file round trip
    model.trainer = None
    model.eval()
    x = torch.randn(5, 3, 4, 4)
    ref = model(x)
    p = pack_model(model)
    assert {n: p.get_submodule(n).fmt for n in LAYERS} == dict.fromkeys(LAYERS, "ternary")
    assert torch.allclose(p(x), ref, atol=1e-5)
    save_packed(p, tmp_path / "elq.safetensors")
    q = load_packed(tmp_path / "elq.safetensors", TinyCNN().eval())
    assert torch.equal(q(x), p(x))
    assert torch.equal(q.fc.dequantize(), model.fc.quantized_weight())


def test_binary_packs_exactly_and_roundtrips_state(tmp_path):
    import json

    from qtrain.export import pack_model
    from qtrain.nn.packed import PackedLinear

    pl.seed_everything(0)
    model = TinyCNN()
    elq = ELQCallback(kind="binary", schedule=[0.5, 1.0], boundaries=[0, 2], unit="step",
                      stages_file=str(tmp_path / "stages.json"))
    trainer(max_steps=3, callbacks=[elq]).fit(model, image_loader(n=32, batch=8))
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert [(h["stage"], h["layer"]) for h in stages] == [(t, n) for t in (1, 2) for n in LAYERS]
    x = torch.randn(4, 3, 4, 4)
    model.eval()
    ref = model(x)
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach()
        assert set(torch.unique(w).tolist()) == {-elq.alpha[name], elq.alpha[name]} or \
            torch.allclose(w.abs(), torch.full_like(w, elq.alpha[name]))
    packed = pack_model(model)
    fmts = {n: m.fmt for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert fmts == dict.fromkeys(LAYERS, "binary")
    assert torch.allclose(packed(x), ref, atol=1e-4)
    fresh = ELQCallback(kind="binary", schedule=[0.5, 1.0])
    fresh.load_state_dict(elq.state_dict())
    assert fresh.stage == 2 and fresh.alpha == elq.alpha
    with pytest.raises(ConfigError, match="kind"):
        ELQCallback(kind="ternary", schedule=[0.5, 1.0]).load_state_dict(elq.state_dict())


def test_bad_config():
    with pytest.raises(ConfigError, match="elq.kind"):
        ELQCallback(kind="quaternary")
    with pytest.raises(ConfigError, match="elq.lam"):
        ELQCallback(lam=0)
    with pytest.raises(ConfigError, match="elq.boundaries"):
        ELQCallback(schedule=[0.5, 1.0], boundaries=[0])
    with pytest.raises(ConfigError, match="elq.schedule"):
        ELQCallback(schedule=[0.5, 0.9])
    with pytest.raises(ConfigError, match="nomatch"):
        trainer(max_steps=1, callbacks=[ELQCallback(include=["nomatch"])]).fit(
            TinyCNN(), image_loader())


class _EpochEndWeights(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_fp32_snapshot_is_the_weights_before_the_first_stage_and_loads_after_conversion(tmp_path):
    pl.seed_everything(0)
    model = TinyCNN()
    elq = ELQCallback(kind="ternary", schedule=[0.5, 1.0], boundaries=[1, 2], unit="epoch")
    ends = _EpochEndWeights()
    loader = image_loader(n=32, batch=8)
    trainer(max_epochs=3, callbacks=[elq, ends], default_root_dir=str(tmp_path)).fit(
        model, loader, loader)
    assert elq.fp32_metric is not None
    for k, v in ends.states[0].items():  # end of the FP32 epoch 0 = the snapshot
        assert torch.equal(elq.fp32_state[k], v), k
    model.load_state_dict(elq.fp32_state)  # strict: the converted layers' alpha is included
    assert torch.equal(model.fc.weight, ends.states[0]["fc.weight"])


def test_reset_optimizer_rebuilds_after_each_later_stage():
    pl.seed_everything(0)
    elq = ELQCallback(kind="ternary", schedule=[0.5, 0.75, 1.0], boundaries=[0, 2, 4],
                      unit="step", reset_optimizer=True)
    ids = OptimizerIdentities()
    trainer(max_steps=6, callbacks=[elq, ids]).fit(TinyCNN(), image_loader(n=48, batch=8))
    # stages at steps 0, 2, 4; the rebuild lands on the batch after stages 2 and 3
    assert [len(set(ids.ids[:i])) for i in (3, 4, 5, 6)] == [1, 2, 2, 3]
