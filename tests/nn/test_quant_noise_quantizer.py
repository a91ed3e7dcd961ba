"""Quant-Noise quantizers (Fan et al. 2020) against independent references: the paper's
min-max quantizer (numpy / PyTorch's MinMaxObserver + fake-quant op), per-weight Bernoulli
noise (fairseq's scalar modules), fairseq's "drop" PQ noise re-derived, the brute-force
nearest codeword of the current weight, fairseq's output ActivationQuantizer re-derived."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d, QuantEmbedding, QuantLinear
from qtrain.nn.quant_noise import OutputQuantNoise, QuantNoiseQuantizer
from qtrain.quant import quant_noise as QN


def _np_minmax(w, bits):
    """Paper sec. 3.1 by hand: s = (max - min) / (2^N - 1), z = round(-min / s) (numpy's
    round is half-to-even like torch), codes clamp(round(w / s) + z, 0, 2^N - 1)."""
    w = np.asarray(w, dtype=np.float64)
    lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
    s = (hi - lo) / (2**bits - 1)
    z = np.round(-lo / s)
    codes = np.clip(np.round(w / s) + z, 0, 2**bits - 1)
    return (codes - z) * s, codes, s, z


def _observer_ref(w, bits):
    """PyTorch's MinMaxObserver (what fairseq's emulate_int8_tensor calls) + fake-quant op."""
    obs = MinMaxObserver(quant_min=0, quant_max=2**bits - 1)
    obs(w)
    s, z = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(w, float(s), int(z), 0, 2**bits - 1), s, z


def _stepped(q, n=1):
    for _ in range(n):
        q.new_step()
    return q


# -- item 1: min-max asymmetric per tensor ------------------------------------------------
def test_int4_minmax_hand_worked_uses_all_levels_and_half_step_error():
    w = torch.linspace(-0.21, 1.0, 241).reshape(1, -1)  # ~ the range [-0.2, 1]
    q = QuantNoiseQuantizer(mode="int4", eval_p=1.0).eval()
    out = q(w)
    ref, codes, s, z = _np_minmax(w.numpy(), 4)
    assert s == pytest.approx(1.21 / 15) and z == 3  # round(0.21 / 0.0807) = round(2.60)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)
    assert len(np.unique(codes)) == 16  # all 2^4 levels used (symmetric amax: 9)
    assert out.unique().numel() == 16
    # max |phi(w) - w| is half a min-max step (symmetric amax clipped w=1.0: 1.7x that)
    assert float((out - w).abs().max()) <= s / 2 + 1e-6
    obs_ref, obs_s, obs_z = _observer_ref(w, 4)
    assert torch.equal(out, obs_ref) and int(obs_z) == z


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("int4", 4)])
def test_int_per_tensor_equals_minmax_observer_and_export(mode, bits):
    torch.manual_seed(0)
    w = torch.randn(48, 40) * 0.3 + 0.1
    q = QuantNoiseQuantizer(mode=mode, eval_p=1.0).eval()
    ref, s, z = _observer_ref(w, bits)
    assert torch.equal(q(w), ref)
    e = q.export_qparams(w)
    assert e["codes"].min() >= 0 and e["codes"].max() == 2**bits - 1 and not e["symmetric"]
    assert float(e["scale"]) == float(s) and float(e["zero_point"]) == float(z)
    assert torch.equal((e["codes"] - e["zero_point"]) * e["scale"], ref)
    assert q.storage_bits(w) == w.numel() * bits + 32 + bits  # codes + fp32 scale + zero-point


def test_channel_option_is_symmetric_per_row():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    q = QuantNoiseQuantizer(mode="int8", granularity="channel", eval_p=1.0).eval()
    scale = w.abs().amax(1) / 127.5
    ref = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros(16, dtype=torch.int32), 0, -128, 127)
    torch.testing.assert_close(q(w), ref)


# -- item 2: int noise per weight -----------------------------------------------------------
def test_int_noise_is_bernoulli_per_weight_not_per_block():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    p = 0.5
    q = _stepped(QuantNoiseQuantizer(p=p, block_size=8, mode="int8", seed=3).train())
    out = q(w)
    noised = out != w
    frac = noised.float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / w.numel())
    # independent per weight: a block of 8 is mixed with probability 1 - p^8 - (1-p)^8
    mixed = noised.reshape(128, 32, 8)
    mixed = (mixed.any(-1) & ~mixed.all(-1)).float().mean().item()
    assert mixed == pytest.approx(1 - 2 * 0.5**8, abs=0.02)
    # neighbours are uncorrelated (block noise: correlation 1 within a block)
    a, b = noised[:, 0::2].float().flatten(), noised[:, 1::2].float().flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.05
    phi = _observer_ref(w, 8)[0]
    assert torch.equal(out[noised], phi[noised])  # a noised weight takes its min-max value


def test_masks_reproducible_change_every_step_and_need_a_step():
    w = torch.randn(32, 64)
    a = QuantNoiseQuantizer(p=0.3, seed=1).train()
    with pytest.raises(RuntimeError, match="new_step"):
        a(w)  # nothing advances the mask: refuse instead of a silent constant mask
    b = _stepped(QuantNoiseQuantizer(p=0.3, seed=1).train())
    _stepped(a)
    o1 = a(w)
    assert torch.equal(o1, b(w))  # same seed and step: same mask (resume, DDP ranks)
    assert torch.equal(a(w), o1)  # second use within the step (tied layer): same mask
    w.mul_(1.0)  # an in-place update alone does not start a step
    assert torch.equal(a(w), o1)
    a.new_step()
    assert not torch.equal(a(w), o1) and int(a.step) == 2


def test_eval_p_zero_is_float_and_eval_does_not_step():
    w = torch.randn(16, 32)
    qz = QuantNoiseQuantizer(p=0.1).eval()
    assert torch.equal(qz(w), w)
    assert int(qz.step) == 0


def test_noisy_forward_never_writes_parameter_and_ste_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    w0 = lin.weight.detach().clone()
    q = QuantLinear.from_float(lin, _stepped(QuantNoiseQuantizer(p=0.5)))
    x = torch.randn(4, 64)
    out = q(x)
    assert torch.equal(lin.weight, w0)
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    torch.testing.assert_close(lin.weight.grad, g_out.t() @ x)  # straight-through


# -- item 4: drop mode ----------------------------------------------------------------------
def _fairseq_drop(weight, mask, p):
    """fairseq quant_noise's forward pre-hook value: s * weight.masked_fill(mask, 0)."""
    s = 1 / (1 - p)
    return s * weight.masked_fill(mask, 0)


def test_drop_mode_zeroes_blocks_rescales_rest_and_is_non_destructive():
    torch.manual_seed(0)
    p, bs = 0.25, 4
    lin = nn.Linear(32, 64)
    w0 = lin.weight.detach().clone()
    qz = QuantNoiseQuantizer(p=p, block_size=bs, mode="drop", bits=3, seed=5)
    ql = QuantLinear.from_float(lin, qz)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)  # lr 0: any change would be a write
    zero_frac = []
    for _ in range(20):
        qz.new_step()
        wn = ql.quantized_weight()
        dropped = (wn == 0).reshape(64, 8, bs)
        assert (dropped.all(-1) | ~dropped.any(-1)).all()  # whole blocks of 4 inputs
        mask = (wn == 0)
        assert torch.equal(wn, _fairseq_drop(lin.weight.detach(), mask, p))
        zero_frac.append(dropped.all(-1).float().mean().item())
        x = torch.randn(5, 32)
        g = torch.randn(5, 64)
        opt.zero_grad()
        (ql(x) * g).sum().backward()
        torch.testing.assert_close(lin.weight.grad, g.t() @ x)  # identity STE (as fairseq)
        opt.step()
    assert torch.equal(lin.weight, w0)  # never written: nothing compounds
    assert np.mean(zero_frac) == pytest.approx(p, abs=0.05)
    assert len(set(zero_frac)) > 1  # a new subset every step
    qz.eval_p = 1.0
    ql.eval()  # evaluated as the PQ model (drop is a training noise)
    a, rec = qz.pq_codes(lin.weight)
    assert torch.equal(ql.quantized_weight(), rec) and qz.centroids.shape == (8, bs)
    with pytest.raises(ConfigError, match="p < 1"):
        QuantNoiseQuantizer(p=1.0, mode="drop")


# -- item 5: PQ value of the current weight -------------------------------------------------
def _brute_nearest(w, centroids, bs):
    blocks = w.detach().reshape(-1, bs).numpy().astype(np.float64)
    c = centroids.numpy().astype(np.float64)
    idx = np.array([int(np.argmin(((c - b) ** 2).sum(1))) for b in blocks])
    return idx, c[idx].reshape(w.shape)


def test_pq_value_is_nearest_codeword_of_current_weight():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    qz = QuantNoiseQuantizer(bits=3, p=1.0, block_size=4, mode="pq", pq_n_iter=5,
                             pq_refresh=1000)
    ql = QuantLinear.from_float(lin, qz)
    qz.new_step()
    ql(torch.randn(2, 16))  # fits the codebook at step 1
    cents = qz.centroids.clone()
    with torch.no_grad():  # a large "optimizer update" after the fit
        lin.weight.copy_(torch.randn(32, 16) * 0.5 + torch.linspace(-1, 1, 16))
    for mode in ("train", "eval"):
        if mode == "train":
            qz.new_step()
            ql.train()
        else:
            qz.eval_p = 1.0
            ql.eval()
        idx, ref = _brute_nearest(lin.weight, cents, 4)
        assert torch.equal(qz.centroids, cents)  # not refitted (pq_refresh = 1000)
        np.testing.assert_allclose(ql.quantized_weight().detach().numpy(), ref, atol=1e-6)
    e = qz.export_qparams(lin.weight)
    assert e["codes"].reshape(-1).tolist() == idx.tolist()


def test_pq_conv_whole_kernels_and_embedding():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    q = QuantConv2d.from_float(conv, _stepped(QuantNoiseQuantizer(bits=2, p=0.5, mode="pq")))
    noisy = q.quantized_weight()
    isq = (noisy != conv.weight).reshape(8, 16, 9)
    assert (isq.all(-1) | ~isq.any(-1)).all() and 0 < isq.all(-1).float().mean() < 1
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(q(x), F.conv2d(x, noisy, conv.bias, padding=1))
    m = QN.block_mask(torch.zeros(8, 16, 1, 1), 0.5, 4, torch.Generator().manual_seed(0))
    m = m.reshape(8, 4, 4)
    assert (m.all(-1) | ~m.any(-1)).all()
    emb = nn.Embedding(64, 16)
    qz = QuantNoiseQuantizer(bits=3, p=1.0, block_size=4, mode="pq", pq_n_iter=5)
    qe = QuantEmbedding.from_float(emb, _stepped(qz))
    idx = torch.tensor([1, 5, 9])
    out = qe(idx)
    ref = torch.as_tensor(_brute_nearest(emb.weight, qz.centroids, 4)[1]).float()
    torch.testing.assert_close(out, ref[idx])
    assert qz.storage_bits(emb.weight) == 256 * 3 + 16 * 8 * 4
    fresh = QuantEmbedding.from_float(nn.Embedding(64, 16), QuantNoiseQuantizer(
        bits=3, p=1.0, block_size=4, mode="pq"))
    sd = dict(qe.state_dict())
    sd["weight_quantizer.assignments"] = torch.zeros(256, dtype=torch.long)  # old checkpoint
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.weight_quantizer.centroids, qz.centroids)


# -- item 3: output activations (fairseq's ActivationQuantizer) -----------------------------
def test_output_quantizer_range_clamp_and_full_quantization():
    torch.manual_seed(0)
    aq = OutputQuantNoise(bits=8, p=0.0, update_step=3).train()
    y1 = (torch.randn(4, 10) * 2).requires_grad_()
    aq.new_step()
    out1 = aq(y1)
    _, s1, z1 = _observer_ref(y1.detach(), 8)  # range of the step-1 output
    lo, hi = float(-z1 * s1), float((255 - z1) * s1)
    assert torch.equal(out1, y1.detach().clamp(lo, hi))  # p = 0: clamp only (fairseq)
    y2 = (torch.randn(4, 10) * 5).requires_grad_()  # wider: clamped to the step-1 range
    aq.new_step()
    out2 = aq(y2)
    assert torch.equal(out2, y2.detach().clamp(lo, hi)) and not torch.equal(out2, y2)
    out2.sum().backward()
    inside = (y2 >= lo) & (y2 <= hi)
    assert torch.equal(y2.grad, inside.float())  # clipped straight-through
    aq.eval_p = 1.0
    aq.eval()
    ref = torch.fake_quantize_per_tensor_affine(y2.detach(), float(s1), int(z1), 0, 255)
    assert torch.equal(aq(y2.detach()), ref)  # evaluation: fully quantized, stored range
    aq.train()
    aq.new_step()
    aq.new_step()  # step 4 = 1 + update_step: the range is refitted from this output
    y4 = torch.randn(4, 10) * 3
    _, s4, z4 = _observer_ref(y4, 8)
    assert torch.equal(aq(y4), y4.clamp(float(-z4 * s4), float((255 - z4) * s4)))
    assert float(aq.scale) == float(s4) and int(aq.fitted_at) == 4
    # with p > 0 a Bernoulli(p) subset of the (in-range) outputs takes its quantized value
    aq.p = 0.5
    aq.new_step()
    y5 = torch.randn(100, 100)
    out5 = aq(y5)
    s, z = aq.scale, aq.zero_point
    q5 = torch.fake_quantize_per_tensor_affine(y5, float(s), int(z), 0, 255)
    frac = ((out5 == q5) & (out5 != y5)).float().mean().item()
    assert frac == pytest.approx(0.5, abs=0.02)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="mode"):
        QuantNoiseQuantizer(mode="int2")
    with pytest.raises(ConfigError, match="bits=4"):
        QuantNoiseQuantizer(bits=8, mode="int4")
    with pytest.raises(ConfigError, match="p=1.5"):
        QuantNoiseQuantizer(p=1.5)
    with pytest.raises(ConfigError, match="block_size=5"):
        _stepped(QuantNoiseQuantizer(p=0.5, block_size=5, mode="pq"))(torch.randn(4, 12))
    with pytest.raises(ConfigError, match="update_step"):
        OutputQuantNoise(8, update_step=0)
