"""Observers and the calibrate-then-freeze CalibratedQuantizer."""

import pytest
import torch

from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.observers import ACIQObserver, HistogramObserver, MinMaxObserver
from qtrain.quant import aciq, calibration


def test_minmax_and_ema_by_hand():
    o = MinMaxObserver()
    o.update(torch.tensor([1.0, -2.0]))
    o.update(torch.tensor([3.0, -1.0]))
    assert [v.item() for v in o.compute_range(8)] == [-2.0, 3.0]
    e = MinMaxObserver(momentum=0.25)
    e.update(torch.tensor([1.0, -2.0]))
    assert [v.item() for v in e.compute_range(8)] == [-2.0, 1.0]  # t = 1: the batch
    e.update(torch.tensor([3.0, -1.0]))
    lo, hi = e.compute_range(8)
    # TF's debiased EMA by hand: b = 0.75 b + 0.25 r from b = 0, range = b / (1 - 0.75^t)
    b_lo, b_hi = 0.75 * (0.25 * -2) + 0.25 * -1, 0.75 * (0.25 * 1) + 0.25 * 3
    assert lo.item() == pytest.approx(b_lo / (1 - 0.75**2))
    assert hi.item() == pytest.approx(b_hi / (1 - 0.75**2))


def test_ema_observer_default_decay_and_hand_loop():
    from qtrain.nn.observers import make_observer
    o = make_observer("ema")
    assert o.momentum == pytest.approx(0.001)  # decay 0.999 (Jacob 2018, TensorFlow)
    g = torch.Generator().manual_seed(0)
    b_lo = b_hi = 0.0
    for t in range(1, 41):
        x = torch.randn(50, generator=g) * (1 + t / 10)
        o.update(x)
        b_lo = 0.999 * b_lo + 0.001 * x.min().item()
        b_hi = 0.999 * b_hi + 0.001 * x.max().item()
    lo, hi = o.compute_range(8)
    assert lo.item() == pytest.approx(b_lo / (1 - 0.999**40), rel=1e-5)
    assert hi.item() == pytest.approx(b_hi / (1 - 0.999**40), rel=1e-5)


def test_histogram_kl_single_batch_equals_function():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    o = HistogramObserver("kl", bins=512)
    o.update(x)
    for bits in (8, 4, 2):
        t = calibration.kl_threshold(x, bits, bins=512)
        lo, hi = o.compute_range(bits)
        assert hi.item() == pytest.approx(t, rel=1e-6) and lo.item() == pytest.approx(-t, rel=1e-6)


def test_histogram_kl_unsigned_grid_only_for_affine_non_negative_stream():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,)).abs()
    o = HistogramObserver("kl", bins=512)
    o.update(x)
    t_u = calibration.kl_threshold(x, 4, unsigned=True, bins=512)  # 16 levels on [0, t]
    t_s = calibration.kl_threshold(x, 4, unsigned=False, bins=512)  # 8 levels on [0, t]
    assert t_u != t_s
    assert o.compute_range(4, symmetric=False)[1].item() == pytest.approx(t_u, rel=1e-6)
    assert o.compute_range(4, symmetric=True)[1].item() == pytest.approx(t_s, rel=1e-6)


def test_histogram_rebinning_keeps_counts_and_percentile():
    o = HistogramObserver("percentile", bins=1000, percentile=99.0)
    torch.manual_seed(0)
    xs = [torch.rand(5000) * s for s in (1.0, 2.0, 4.0)]  # range grows twice
    for x in xs:
        o.update(x)
    assert o.hist.sum().item() == 15000
    ref = torch.cat(xs).abs().kthvalue(int(0.99 * 15000)).values.item()
    lo, hi = o.compute_range(8)
    assert lo.item() == 0.0  # non-negative stream
    assert hi.item() == pytest.approx(ref, abs=3 * 4.0 / 1000 + 0.02)


def test_histogram_mse_clips_laplace_at_low_bits():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    o = HistogramObserver("mse")
    o.update(x)
    _, hi = o.compute_range(3)
    assert 0.2 * x.abs().max() < hi < 0.8 * x.abs().max()


def test_aciq_observer_single_batch_equals_function():
    x = torch.randn(10000) * 2 + 0.5
    o = ACIQObserver("gaussian")
    o.update(x)
    lo, hi = o.compute_range(4)
    rlo, rhi = aciq.aciq_range(x, 4, "gaussian")
    assert lo.item() == pytest.approx(rlo.item(), rel=1e-5)
    assert hi.item() == pytest.approx(rhi.item(), rel=1e-5)


def test_observer_nan_names_layer():
    o = HistogramObserver(name="layer2.0.conv1")
    with pytest.raises(ValueError, match="layer2.0.conv1"):
        o.update(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="layer2.0.conv1.*no data"):
        o.compute_range(8)
    with pytest.raises(ValueError, match="calibration 'entropy'"):
        CalibratedQuantizer(8, "entropy")


@pytest.mark.parametrize("calib", ["minmax", "percentile", "kl", "mse", "aciq"])
def test_calibrate_then_freeze_flow(calib):
    torch.manual_seed(0)
    kw = {"bins": 512} if calib == "kl" else {}
    q = CalibratedQuantizer(8, calib, symmetric=False, **kw)
    batches = [torch.relu(torch.randn(64, 100)) for _ in range(3)]
    q.calibrating = True
    for b in batches:
        assert torch.equal(q(b), b)  # collects, passes through
    q.freeze()
    assert not q.calibrating and bool(q.frozen)
    lo, hi = q.observer.compute_range(8, False)
    assert lo.item() == 0.0  # non-negative stream: [0, hi] on codes 0..255, hi the top level
    x = torch.relu(torch.randn(10, 100))
    ref = torch.fake_quantize_per_tensor_affine(x, hi.item() / 255, 0, 0, 255)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-6)
    # frozen range survives a state_dict round trip into a fresh quantizer
    q2 = CalibratedQuantizer(8, calib, symmetric=False, **kw)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), q(x))
    assert q.storage_bits(x) == 8 * 1000 + 32 + 8


def test_qat_tracking_mode_uses_ema():
    q = CalibratedQuantizer(4, "ema", momentum=0.5)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-3.0, 3.0]))
    lo, hi = q.observer.compute_range(4)
    m = (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25)  # debiased EMA, decay 0.5, by hand
    assert lo.item() == pytest.approx(-m) and hi.item() == pytest.approx(m)
    q.eval()
    q(torch.tensor([-100.0, 100.0]))  # eval: range not updated
    assert q.observer.max_val.item() == hi.item()


def test_value_aware_quantizer_storage_and_outliers():
    w = torch.randn(50, 20)
    q = ValueAwareQuantizer(4, ratio=0.02)
    out = q(w)
    k = 20  # ceil(0.02 * 1000)
    idx = w.abs().flatten().topk(k).indices
    assert torch.equal(out.flatten()[idx], w.flatten()[idx])
    assert q.storage_bits(w) == 4 * 1000 + k * (32 + 10) + 32
