"""qtrain.layer_report / qtrain.weight_histograms without a Trainer: the row of a 2-bit layer
against a hand computation (numpy), the storage accounting's bits, PQ reconstruction error,
a no-op quantizer caught by the level count, and the sampler leaving the global RNG alone."""

import numpy as np
import pytest
import torch
from torch import nn

from qtrain import layer_report as LR
from qtrain import weight_histograms as WH
from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.pq_layers import pq_from_state
from qtrain.nn.quantizer_base import Quantizer
from qtrain.nn.uniform_quantizer import UniformQuantizer


def two_bit_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    m[0] = QuantLinear.from_float(m[0], UniformQuantizer(2, symmetric=True, granularity="tensor"))
    return m


def hand_2bit(w: np.ndarray) -> np.ndarray:
    """Symmetric 2-bit per-tensor grid by hand: codes -2..1, scale = max|w| / 1.5."""
    s = np.abs(w).max() / 1.5
    return np.clip(np.round(w / s), -2, 1) * s


def test_row_of_a_2bit_layer_matches_hand_computation():
    m = two_bit_model()
    rep = LR.layer_report(m)
    assert [r["layer"] for r in rep.rows] == ["0"]  # the float Linear is not reported
    (r,) = rep.rows
    w = m[0].weight.detach().numpy().astype(np.float64)
    q = hand_2bit(w)
    assert r["rel_error"] == pytest.approx(np.linalg.norm(q - w) / np.linalg.norm(w), rel=1e-6)
    # storage: 2 bits per code + one fp32 scale + fp32 bias (8), per weight element
    assert r["storage_bits"] == 128 * 2 + 32 + 8 * 32
    assert r["bits_per_weight"] == pytest.approx((128 * 2 + 32 + 8 * 32) / 128)
    assert r["bits"] == 2 and r["params"] == 128 and r["method"] == "UniformQuantizer"
    assert 2 <= r["levels"] <= 4
    assert r["reference"] == "float master weight"


def test_report_has_no_side_effects_on_quantizer_or_rng():
    m = two_bit_model()
    m[0].weight_quantizer.enabled = False  # an FP32 phase: the report still shows Q(W)
    state = torch.get_rng_state()
    rep = LR.layer_report(m)
    assert torch.equal(torch.get_rng_state(), state)
    assert m[0].weight_quantizer.enabled is False
    assert rep.rows[0]["rel_error"] > 0.05 and rep.rows[0]["levels"] <= 4


def test_noop_quantizer_is_visible_in_levels():
    """A quantizer that returns its input has error 0 and as many levels as weights."""
    torch.manual_seed(0)
    lin = QuantLinear.from_float(nn.Linear(16, 8), Quantizer(32))
    (r,) = LR.layer_report(nn.Sequential(lin)).rows
    assert r["rel_error"] == 0.0 and r["levels"] == 128 and r["bits_per_weight"] == 32 + 8 * 32 / 128


def test_pq_layer_error_needs_the_pre_event_reference():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    w0 = lin.weight.detach().clone()
    cents = torch.randn(4, 4)
    assign = torch.randint(0, 4, (8,))
    pq = pq_from_state(lin, cents, assign)
    model = nn.Sequential(pq)
    (r,) = LR.layer_report(model).rows
    assert np.isnan(r["rel_error"]) and r["n_centroids"] == 4 and r["block_size"] == 4
    ip = {"0": LR.InPlace(w0, "IterativePQ", "iterativepq_stage1")}
    (r,) = LR.layer_report(model, ip).rows
    w_hat = cents[assign].reshape(4, 8)  # hand reconstruction: block i = centroid assign[i]
    assert r["rel_error"] == pytest.approx(float((w_hat - w0).norm() / w0.norm()), rel=1e-5)
    assert r["reference"] == "before iterativepq_stage1"
    assert r["storage_bits"] == pq.storage_bits()  # the accounting's row


def test_in_place_layer_and_extra_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(0).add_(torch.sign(w0) * 0.25)
    ip = {"0": LR.InPlace(w0, "INQ", "inq_stage1", bits=5)}
    (r,) = LR.layer_report(model, ip, {"sensitivity": {"0": 3.5}}).rows
    assert r["method"] == "INQ (in place)" and r["bits"] == 5 and r["sensitivity"] == 3.5
    assert r["levels"] == 2 and r["bits_per_weight"] == pytest.approx((32 * 32 + 4 * 32) / 32)
    expect = float((torch.sign(w0) * 0.25 - w0).norm() / w0.norm())
    assert r["rel_error"] == pytest.approx(expect, rel=1e-6)


def test_sampler_is_bounded_deterministic_and_private():
    w = torch.randn(100_000)
    q = torch.round(w)
    state = torch.get_rng_state()
    a = WH.sample("fc", w, q, 1000, seed=3)
    b = WH.sample("fc", w, q, 1000, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is not consumed
    assert len(a.quant_values) == 1000
    assert np.array_equal(a.float_values, b.float_values)
    assert np.array_equal(np.round(a.float_values), a.quant_values)  # same positions
    assert not np.array_equal(a.float_values, WH.sample("fc", w, q, 1000, seed=4).float_values)
    small = WH.sample("s", w[:50], q[:50], 1000, 0)
    assert np.array_equal(small.float_values, w[:50].numpy())


def test_choose_layers_evenly_spaced():
    names = [f"l{i}" for i in range(10)]
    assert WH.choose_layers(names, 3) == ["l0", "l4", "l9"]  # round(4.5) = 4
    assert WH.choose_layers(names, 20) == names and WH.choose_layers(names, 0) == []
