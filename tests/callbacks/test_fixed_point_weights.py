"""Gupta 2015 fixed-point weight storage: weights on the <IL, FL> grid after every step, the
update lost under round-to-nearest and kept in expectation under stochastic rounding (real
Lightning Trainer, tiny model)."""

import pytest
import torch

from qtrain.callbacks.fixed_point_weights import FixedPointWeightStorage
from qtrain.errors import ConfigError
from qtrain.nn.convert import LayerSelectionError
from tests.callbacks.tiny_lightning import TinyCNN, image_loader, trainer


class _PlainSGD(TinyCNN):
    def configure_optimizers(self):  # the paper's MNIST optimizer: no momentum, no decay
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _on_grid(t: torch.Tensor, fl: int) -> bool:
    s = t.detach() * 2.0**fl
    return bool(torch.all(s == torch.round(s)))


def _fit(model, cb, steps=4):
    trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
            callbacks=[cb]).fit(model, image_loader())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_weights_and_biases_stay_on_the_grid_and_in_range(rounding):
    torch.manual_seed(0)
    model = _PlainSGD(lr=0.5)
    with torch.no_grad():
        model.fc.weight.mul_(40)  # some weights beyond the <2, 6> range: saturate to [-2, 2 - 2^-6]
    cb = FixedPointWeightStorage(bits=8, frac_bits=6, rounding=rounding, seed=1)
    _fit(model, cb)
    assert set(cb.tensors) == {"conv1.weight", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"}
    for t in cb.tensors.values():
        assert _on_grid(t, 6)
        assert t.min() >= -2 and t.max() <= 2 - 2.0**-6
    assert model.fc.weight.max() == 2 - 2.0**-6  # saturated, not wrapped
    assert model.bn1.weight.grad is not None and not _on_grid(model.bn1.weight + 1e-3, 6)


def test_small_updates_vanish_with_nearest_and_survive_with_stochastic():
    """|lr * grad| below eps/2: round-to-nearest never moves a weight (the stall of Gupta's
    Fig. 2); stochastic rounding moves them, and the total move is the float update's."""
    fl, eps = 8, 2.0**-8
    torch.manual_seed(0)
    base = _PlainSGD()
    with torch.no_grad():  # start on the grid, so the initial rounding is the identity
        for p in (base.fc.weight, base.fc.bias):
            p.copy_(torch.round(p / eps) * eps)
    x, y = next(iter(image_loader()))
    ref = _PlainSGD()
    ref.load_state_dict(base.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    g = ref.fc.weight.grad
    lr = 0.45 * (eps / 2) / g.abs().max().item()  # every update under eps/2
    want = -lr * g
    moved = {}
    for rounding in ("nearest", "stochastic"):
        model = _PlainSGD(lr=lr)
        model.load_state_dict(base.state_dict())
        start = model.fc.weight.detach().clone()
        _fit(model, FixedPointWeightStorage(bits=16, frac_bits=fl, rounding=rounding, seed=3,
                                            include=["fc"]), steps=1)
        moved[rounding] = model.fc.weight.detach() - start
    assert torch.all(moved["nearest"] == 0)
    # each move is 0 or sign(update) * eps with P = |update| / eps: E = update; the number of
    # moves and the total move are within 5 standard deviations of their expectations
    p = (want.abs() / eps).flatten()
    var = (p * (1 - p)).sum().item()
    n_moves = int((moved["stochastic"] != 0).sum())
    assert n_moves >= 5 and abs(n_moves - p.sum().item()) < 5 * var**0.5
    std = eps * var**0.5
    assert abs(moved["stochastic"].sum().item() - want.sum().item()) < 5 * std
    assert torch.all(moved["stochastic"] * want >= 0)  # never against the update


def test_state_roundtrip_continues_the_random_stream():
    cb = FixedPointWeightStorage(bits=16, frac_bits=10, rounding="stochastic", seed=5)
    cb.tensors = {"a": torch.rand(1000) * 1e-3}
    cb.round_now()
    state = cb.state_dict()
    x = torch.rand(1000) * 1e-3
    cb.tensors = {"a": x.clone()}
    cb.round_now()
    first = cb.tensors["a"].clone()
    cb2 = FixedPointWeightStorage(bits=16, frac_bits=10, rounding="stochastic", seed=5)
    cb2.load_state_dict(state)
    cb2.tensors = {"a": x.clone()}
    cb2.round_now()
    assert torch.equal(first, cb2.tensors["a"])


@pytest.mark.parametrize("kw", [dict(bits=16, frac_bits=16), dict(rounding="up"),
                                dict(types=["Embedding"]), dict(params=["running_mean"]),
                                dict(start_epoch=-1)])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        FixedPointWeightStorage(**kw)


def test_pattern_matching_no_layer_is_an_error():
    cb = FixedPointWeightStorage(include=["nope"])
    with pytest.raises(LayerSelectionError):
        _fit(_PlainSGD(), cb, steps=1)
