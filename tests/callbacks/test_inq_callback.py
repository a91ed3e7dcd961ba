"""INQ callback with a real pl.Trainer: frozen weights never move, masks grow, BN excluded."""

import pytest
import pytorch_lightning as pl
import torch

from qtrain.callbacks.inq import INQCallback
from tests.callbacks.tiny_lightning import OptimizerIdentities, TinyCNN, image_loader, trainer


class _Probe(pl.Callback):
    """Records masks and frozen weight values after every optimizer step."""

    def __init__(self, inq):
        self.inq, self.history = inq, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        snap = {n: (self.inq.masks[n].clone(), m.weight.detach().clone())
                for n, m in self.inq._layers.items() if n in self.inq.masks}
        self.history.append(snap)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_frozen_weights_never_change_and_masks_grow(optim):
    pl.seed_everything(0)
    model = TinyCNN(optim=optim)
    bn_before = model.bn1.weight.detach().clone()
    inq = INQCallback(bits=5, schedule=[0.5, 0.75, 1.0], boundaries=[0, 3, 6], unit="step")
    probe = _Probe(inq)
    trainer(max_steps=10, callbacks=[inq, probe]).fit(model, image_loader(n=32, batch=8))
    assert set(inq.masks) == {"conv1", "conv2", "fc"}  # BN (and biases) excluded by type
    assert not torch.equal(model.bn1.weight.detach(), bn_before)  # BN still trains
    prev = None
    for snap in probe.history:
        for name, (mask, w) in snap.items():
            if prev is not None and name in prev:
                pmask, pw = prev[name]
                assert (mask | ~pmask).all()  # masks only grow
                assert torch.equal(w[pmask], pw[pmask])  # frozen values unchanged
            lv = inq.levels[name]
            assert torch.isin(w[mask], lv).all()  # frozen weights sit on INQ levels
        prev = snap
    fracs = [snap["fc"][0].float().mean().item() for snap in probe.history]
    assert fracs[0] == pytest.approx(0.5, abs=0.01) and fracs[-1] == 1.0
    # levels follow the formula of the original weights' range
    assert inq.levels["fc"].numel() == 2 * 8 + 1
    # free weights did train between stages (momentum / Adam active)
    (_, w0), (m2, w2) = probe.history[0]["conv1"], probe.history[2]["conv1"]
    assert not torch.equal(w0[~m2], w2[~m2])


def test_epoch_boundaries_optimizer_reset_and_state_roundtrip():
    pl.seed_everything(0)
    inq = INQCallback(schedule="5bit", stage_length=1, unit="epoch", reset_optimizer=True)
    ids = OptimizerIdentities()
    trainer(max_epochs=3, callbacks=[inq, ids]).fit(TinyCNN(), image_loader(n=16))
    assert inq.stage == 3 and inq.frozen_fraction() == pytest.approx(0.875, abs=0.01)
    assert len(set(ids.ids)) == 3  # a fresh optimizer at the start of stages 2 and 3
    sd = inq.state_dict()
    # one uint8 level index per weight (255: free) instead of a float copy + bool mask
    assert "frozen" not in sd and "masks" not in sd
    assert all(v.dtype == torch.uint8 and v.shape == inq.masks[k].shape
               for k, v in sd["frozen_index"].items())
    for k, idx in sd["frozen_index"].items():  # independent decode: levels by index, 0 if free
        ref = torch.tensor([0.0 if i == 255 else float(sd["levels"][k][i]) for i in idx.flatten().tolist()])
        assert torch.equal(ref.view_as(inq.frozen[k]), inq.frozen[k]), k
        assert torch.equal(idx != 255, inq.masks[k]), k
    fresh = INQCallback(schedule="5bit")
    fresh.load_state_dict(sd)
    assert fresh.stage == 3
    for k in inq.masks:  # bitwise, dtype included
        assert torch.equal(fresh.masks[k], inq.masks[k]) and fresh.masks[k].dtype == torch.bool
        assert torch.equal(fresh.frozen[k], inq.frozen[k]) and fresh.frozen[k].dtype == inq.frozen[k].dtype
    legacy = {kk: v for kk, v in sd.items() if kk != "frozen_index"}  # older checkpoints
    legacy.update(masks=dict(inq.masks), frozen=dict(inq.frozen))
    old = INQCallback(schedule="5bit")
    old.load_state_dict(legacy)
    assert all(torch.equal(old.frozen[k], inq.frozen[k]) for k in inq.frozen)
    with pytest.raises(ValueError, match="schedule"):
        INQCallback(schedule="4bit").load_state_dict(sd)


def test_bad_config():
    with pytest.raises(ValueError, match="boundaries"):
        INQCallback(schedule="5bit", boundaries=[0, 1])
    with pytest.raises(ValueError, match="unit"):
        INQCallback(unit="batch")
    model = TinyCNN()
    with pytest.raises(ValueError, match="nomatch"):
        trainer(max_steps=1, callbacks=[INQCallback(include=["nomatch"])]).fit(model, image_loader())


def test_layers_end_as_power_of_two_quantized_with_bits_storage():
    from qtrain.nn.fake_quant import is_fake_quant
    from qtrain.quant.size import model_storage_bits

    pl.seed_everything(0)
    model = TinyCNN()
    fp32_bits = model_storage_bits(model).total_bits
    inq = INQCallback(bits=5, schedule=[0.5, 1.0], boundaries=[0, 2], unit="step")
    trainer(max_steps=4, callbacks=[inq]).fit(model, image_loader(n=32, batch=8))
    for name in ("conv1", "conv2", "fc"):
        layer = model.get_submodule(name)
        assert is_fake_quant(layer) and layer.weight_quantizer.bits == 5
        w = layer.weight.detach()
        assert torch.equal(layer.weight_quantizer(w), w)  # already on the INQ levels
    n_w = sum(model.get_submodule(n).weight.numel() for n in ("conv1", "conv2", "fc"))
    saved = fp32_bits - model_storage_bits(model).total_bits
    assert saved == n_w * (32 - 5) - 3 * 8  # 5 bits per weight + an int8 exponent per layer


class _ValAcc(pl.Callback):
    """Records the logged val_acc at the end of every validation."""

    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["val_acc"]))


def test_fp32_metric_is_the_validation_before_the_first_stage(tmp_path):
    pl.seed_everything(0)
    inq = INQCallback(bits=5, schedule=[0.5, 1.0], start=2, stage_length=1, unit="epoch")
    val = _ValAcc()
    loader = image_loader(n=32, batch=8)

    class _Weights(pl.Callback):  # the weights at the end of the last FP32 epoch
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    w = _Weights()
    trainer(max_epochs=4, callbacks=[inq, val, w], default_root_dir=str(tmp_path)).fit(
        TinyCNN(), loader, loader)
    assert len(val.values) == 4
    assert inq.fp32_metric == val.values[1]  # epoch 1 is the last FP32 epoch (stage 0 at 2)
    # the FP32 snapshot is those weights (the run summary tests it), not the quantized ones
    assert inq.fp32_state.keys() == w.state.keys()
    assert all(torch.equal(inq.fp32_state[k], w.state[k]) for k in w.state)
    conv = next(k for k in w.state if k.endswith("weight") and w.state[k].dim() == 4)
    assert not torch.equal(inq.fp32_state[conv], inq._layers[conv.rsplit(".", 1)[0]].weight)
    fresh = INQCallback(bits=5, schedule=[0.5, 1.0])
    fresh.fp32_snapshot.run_dir = str(tmp_path)  # the run dir holding the snapshot file
    fresh.load_state_dict(inq.state_dict())
    assert fresh.fp32_metric == inq.fp32_metric
    assert all(torch.equal(fresh.fp32_state[k], w.state[k]) for k in w.state)
    # no FP32 phase: nothing was validated before the first stage
    pl.seed_everything(0)
    at0 = INQCallback(bits=5, schedule=[0.5, 1.0], boundaries=[0, 2], unit="step")
    trainer(max_steps=4, callbacks=[at0]).fit(TinyCNN(), loader, loader)
    assert at0.fp32_metric is None and at0.fp32_state is None
