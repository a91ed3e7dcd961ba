"""Quant-Noise quantizer: non-destructive, rate p, block alignment, STE, p=1 == quantized."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.fake_quant import QuantConv2d, QuantEmbedding, QuantLinear
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant import quant_noise as QN


def _int8_ref(w, per_channel=False):
    if per_channel:
        amax = w.abs().amax(1)
        scale = amax / 127.5
        return torch.fake_quantize_per_channel_affine(
            w, scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -128, 127)
    scale = float(w.abs().max()) / 127.5
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -128, 127)


def test_noisy_forward_never_writes_parameter_and_ste_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    w0 = lin.weight.detach().clone()
    q = QuantLinear.from_float(lin, QuantNoiseQuantizer(p=0.5, block_size=8))
    x = torch.randn(4, 64)
    for _ in range(3):
        out = q(x)
        assert torch.equal(lin.weight, w0)
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    # straight-through: dL/dW = g_out^T x regardless of the mask
    torch.testing.assert_close(lin.weight.grad, g_out.t() @ x)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.1 * g_out.t() @ x)


def test_noised_fraction_matches_p_and_blocks_align():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    p, bs = 0.2, 8
    qz = QuantNoiseQuantizer(p=p, block_size=bs, seed=3).train()
    out = qz(w)
    ref_q = _int8_ref(w)
    blocks_q = (out == ref_q).reshape(256, 64, bs)
    blocks_f = (out == w).reshape(256, 64, bs)
    noised = blocks_q.all(-1) & ~blocks_f.all(-1)
    # every block is entirely float or entirely quantized (aligned with PQ sub-vectors)
    assert ((blocks_q | blocks_f).all()).item()
    n = noised.numel()
    frac = noised.float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_seeded_masks_reproducible_and_change_per_step():
    w = torch.randn(32, 64)
    a, b = QuantNoiseQuantizer(p=0.3, seed=1), QuantNoiseQuantizer(p=0.3, seed=1)
    o1, o2 = a(w), b(w)
    assert torch.equal(o1, o2)
    assert torch.equal(a(w), o1)  # same, not yet updated weight (a tied 2nd use): same mask
    assert int(a.step) == 1
    w.mul_(1.0)  # an in-place (optimizer) update starts the next step
    assert not torch.equal(a(w), o1)  # next step: new mask
    assert int(a.step) == 2


def test_eval_p_one_is_fully_quantized_and_p_zero_is_float():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    qz = QuantNoiseQuantizer(p=0.1, granularity="tensor").eval()
    assert torch.equal(qz(w), w)
    qz.eval_p = 1.0
    torch.testing.assert_close(qz(w), _int8_ref(w))
    qc = QuantNoiseQuantizer(p=0.1, granularity="channel", eval_p=1.0).eval()
    torch.testing.assert_close(qc(w), _int8_ref(w, per_channel=True))
    q4 = QuantNoiseQuantizer(mode="int4", eval_p=1.0).eval()
    scale = float(w.abs().max()) / 7.5
    torch.testing.assert_close(q4(w), torch.fake_quantize_per_tensor_affine(w, scale, 0, -8, 7))
    assert int(qz.step) == 0  # eval forwards do not advance the mask counter


def test_conv_blocks_are_whole_kernels_and_1x1_channel_groups():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    q = QuantConv2d.from_float(conv, QuantNoiseQuantizer(p=0.5, block_size=4))
    noisy = q.quantized_weight()
    isq = (noisy == _int8_ref(conv.weight.detach())).reshape(8, 16, 9)
    isf = (noisy == conv.weight).reshape(8, 16, 9)
    assert (isq.all(-1) | isf.all(-1)).all()
    assert 0 < isq.all(-1).float().mean() < 1
    m = QN.block_mask(torch.zeros(8, 16, 1, 1), 0.5, 4, torch.Generator().manual_seed(0))
    m = m.reshape(8, 4, 4)
    assert (m.all(-1) | ~m.any(-1)).all()
    x = torch.randn(2, 16, 5, 5)
    q.weight_quantizer.step.fill_(0)  # same step -> same mask as ``noisy``
    torch.testing.assert_close(q(x), F.conv2d(x, noisy, conv.bias, padding=1))


def test_pq_mode_uses_codewords_and_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(64, 16)
    qz = QuantNoiseQuantizer(bits=3, p=1.0, block_size=4, mode="pq", pq_n_iter=5)
    qe = QuantEmbedding.from_float(emb, qz)
    idx = torch.tensor([1, 5, 9])
    out = qe(idx)
    codeword = qz.centroids[qz.assignments].reshape(64, 16)
    torch.testing.assert_close(out, codeword[idx])
    assert qz.centroids.shape == (8, 4)
    assert qz.storage_bits(emb.weight) == 256 * 3 + 16 * 8 * 4
    sd = qe.state_dict()
    fresh = QuantEmbedding.from_float(nn.Embedding(64, 16), QuantNoiseQuantizer(
        bits=3, p=1.0, block_size=4, mode="pq"))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.weight_quantizer.centroids, qz.centroids)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        QuantNoiseQuantizer(mode="int2")
    with pytest.raises(ValueError, match="bits=4"):
        QuantNoiseQuantizer(bits=8, mode="int4")
    with pytest.raises(ValueError, match="p=1.5"):
        QuantNoiseQuantizer(p=1.5)
    with pytest.raises(ValueError, match="block_size=5"):
        QuantNoiseQuantizer(p=0.5, block_size=5)(torch.randn(4, 12))
