"""Activation EMA ranges (Jacob et al. 2018 sec. 3.1; TensorFlow's MovingAvgQuantize with
ema_decay=0.999 and assign_moving_average's zero_debias): the default decay, the debiased
update rule against a hand loop, tracking during the float phase, eval freezing, and
loading a state saved before the debiased EMA."""

import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.hydra_helpers import compose_cfg


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=g) * (1 + 0.05 * t) + 0.01 * t for t in range(n)]


def _tf_loop(batches, d):
    """TF's assign_moving_average(zero_debias=True): biased b from 0, value b / (1 - d^t)."""
    b_lo = b_hi = 0.0
    out = []
    for t, x in enumerate(batches, 1):
        b_lo = d * b_lo + (1 - d) * x.min().item()
        b_hi = d * b_hi + (1 - d) * x.max().item()
        out.append((b_lo / (1 - d**t), b_hi / (1 - d**t)))
    return out


def test_default_decay_is_close_to_one(tmp_path):
    assert UniformQuantizer(8, observer="ema").ema_decay == 0.999
    for quant in ("uniform", "groupwise"):
        cfg = compose_cfg([f"quant={quant}"], tmp_path)
        assert cfg.quant.act.ema_decay == 0.999, quant
    with pytest.raises(ConfigError, match="ema_decay"):
        UniformQuantizer(8, observer="ema", ema_decay=1.0)


@pytest.mark.parametrize("d", [0.999, 0.9])
def test_debiased_ema_equals_hand_loop(d):
    q = UniformQuantizer(8, symmetric=False, observer="ema", ema_decay=d)
    q.train()
    batches = _batches(30)
    ref = _tf_loop(batches, d)
    for x, (lo, hi) in zip(batches, ref):
        q(x)
        assert q.running_min.item() == pytest.approx(lo, rel=1e-5, abs=1e-6)
        assert q.running_max.item() == pytest.approx(hi, rel=1e-5, abs=1e-6)
    assert int(q.ema_steps) == 30
    # first batch: its own range (no constant initial value to forget)
    q1 = UniformQuantizer(8, symmetric=False, observer="ema")
    q1.train()
    q1(batches[0])
    assert (q1.running_min.item(), q1.running_max.item()) == tuple(
        v.item() for v in torch.aminmax(batches[0]))


def test_float_phase_collects_ranges_and_eval_freezes():
    batches = _batches(12)
    q = UniformQuantizer(4, symmetric=False, observer="ema")
    q.train()
    q.enabled = False  # float phase (quant.start_epoch): output unchanged, ranges collected
    for x in batches[:8]:
        assert torch.equal(q(x), x)
    q.enabled = True
    for x in batches[8:]:
        q(x)
    lo, hi = _tf_loop(batches, 0.999)[-1]
    assert q.running_max.item() == pytest.approx(hi, rel=1e-5)
    assert q.running_min.item() == pytest.approx(lo, rel=1e-5)
    q.eval()
    q(batches[0] * 100)
    assert q.running_max.item() == pytest.approx(hi, rel=1e-5) and int(q.ema_steps) == 12


def test_state_without_ema_steps_loads_as_plain_ema():
    q = UniformQuantizer(8, symmetric=False, observer="ema")
    q.train()
    q(_batches(1)[0])
    sd = {k: v for k, v in q.state_dict().items() if k != "ema_steps"}
    q2 = UniformQuantizer(8, symmetric=False, observer="ema")
    q2.load_state_dict(sd)
    assert int(q2.ema_steps) == 10**6 and q2.running_max.item() == q.running_max.item()
    q2.train()
    x = torch.full((4,), 50.0)
    old = q2.running_max.item()
    q2(x)  # the plain EMA step of the saved run: d * old + (1 - d) * 50
    assert q2.running_max.item() == pytest.approx(0.999 * old + 0.001 * 50, rel=1e-5)
