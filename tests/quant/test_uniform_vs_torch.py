"""Uniform fake-quant equals torch.fake_quantize_per_{tensor,channel}_affine (values, grads)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import uniform as U


def _data(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).requires_grad_(True)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_equals_torch(bits, symmetric):
    x = _data((64, 33), bits)
    lo, hi = x.detach().min(), x.detach().max()
    qp = U.qparams_from_range(lo * 0.8, hi * 0.7, bits, symmetric)  # some values clip
    ours = U.fake_quantize(x, qp)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(
        x2, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax
    )
    (gref,) = torch.autograd.grad(ref, x2, g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gref, rtol=0, atol=0)
    assert (gx == 0).any()  # clipping exercised
    _generic_path_matches(x, qp, ref, gref, g)


def _generic_path_matches(x, qp, ref, gref, g):
    """fake_quantize dispatches to torch's fused ops; the generic autograd path (used for
    per-group views and non-fp32 inputs) must give the same values and gradients."""
    x3 = x.detach().clone().requires_grad_(True)
    gen = U._FakeQuantSTE.apply(x3, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    (ggen,) = torch.autograd.grad(gen, x3, g)
    torch.testing.assert_close(gen, ref, rtol=0, atol=0)
    torch.testing.assert_close(ggen, gref, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_equals_torch(bits, symmetric, axis):
    w = _data((16, 8, 3, 3), 10 + bits)
    q = UniformQuantizer(bits, symmetric=symmetric, granularity="channel", axis=axis)
    ours = q(w)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, w, g)
    qp = q.qparams(w)
    w2 = w.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(
        w2, qp.scale.flatten(), qp.zero_point.flatten().to(torch.int32), axis, qp.qmin, qp.qmax
    )
    (gref,) = torch.autograd.grad(ref, w2, g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gref, rtol=0, atol=0)
    _generic_path_matches(w, qp, ref, gref, g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_equals_torch_per_channel_on_group_rows(symmetric):
    w = _data((6, 32), 3)
    q = UniformQuantizer(4, symmetric=symmetric, granularity="group", group_size=8)
    ours = q(w)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, w, g)
    qp = q.qparams(w)  # shapes (6, 4, 1): one scale per row group
    rows = w.detach().reshape(24, 8).clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(
        rows, qp.scale.flatten(), qp.zero_point.flatten().to(torch.int32), 0, qp.qmin, qp.qmax
    )
    (gref,) = torch.autograd.grad(ref, rows, g.reshape(24, 8))
    torch.testing.assert_close(ours, ref.reshape(6, 32), rtol=0, atol=0)
    torch.testing.assert_close(gx, gref.reshape(6, 32), rtol=0, atol=0)


def test_quantizer_module_per_tensor_matches_torch_observer_convention():
    x = _data((256,), 5)
    q = UniformQuantizer(8, symmetric=True)
    amax = x.detach().abs().max().item()
    scale = amax / 127.5  # (qmax - qmin) / 2 = 127.5 with codes [-128, 127]
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), scale, 0, -128, 127)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)


def test_group_granularity_bad_group_size():
    with pytest.raises(ValueError, match="group_size=5"):
        U.fake_quantize_tensor(torch.randn(4, 12), 4, granularity="group", group_size=5)


def test_check_finite_names_layer():
    with pytest.raises(ValueError, match="layer1.conv"):
        U.check_finite(torch.tensor([1.0, float("nan")]), "layer1.conv")


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    data=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=64),
)
def test_property_roundtrip_within_half_step_and_codes_in_range(bits, symmetric, data):
    x = torch.tensor(data, dtype=torch.float32)
    qp = U.qparams_from_range(x.min(), x.max(), bits, symmetric)
    codes = U.quantize(x, qp)
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax
    assert torch.equal(codes, torch.round(codes))
    err = (U.dequantize(codes, qp) - x).abs()
    # within the covered range the error is at most half a step (+ fp32 rounding slack)
    assert (err <= qp.scale / 2 * (1 + 1e-4) + 1e-6 * x.abs().max()).all()
