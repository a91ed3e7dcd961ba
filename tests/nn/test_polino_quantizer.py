"""Polino 2018 differentiable quantization (sec. 2.2 / Algorithm 2): points shared in [0, 1],
rescaled per bucket; against brute-force loops and the authors' code path re-derived in numpy
(antspy/quantized_distillation: quantization/quant_functions.py ``ScalingFunction`` 'linear',
``nonUniformQuantization``, ``nonUniformQuantization_variable.backward``;
quantization/help_functions.py ``create_bucket_tensor``, ``initialize_quantization_points``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn import packed_formats as PF
from qtrain.nn.polino_quantizer import PolinoDifferentiableQuantizer


# -- the authors' code path, re-derived in numpy (float64) ---------------------------------
def authors_bucket(v, bs):
    """create_bucket_tensor(fill_values='last')."""
    v = v.reshape(-1)
    if bs is None:
        return v.reshape(1, -1)
    mult, rest = divmod(v.size, bs)
    if mult == 0:
        return v.reshape(1, -1)
    if rest:
        v = np.concatenate([v, np.full(bs - rest, v[-1])])
    return v.reshape(-1, bs)


def authors_scale(w, bs):
    b = authors_bucket(w, bs)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    alpha = hi - lo
    alpha[alpha < 1e-10] = 1
    return (b - lo) / alpha, alpha, lo


def authors_init(w, bs, n):
    s, _, _ = authors_scale(w, bs)
    return np.percentile(s.reshape(-1)[:w.size], np.linspace(0, 100, num=n))


def authors_forward_backward(w, points, bs, g):
    """nonUniformQuantization (forward: nearest point via searchsorted, inverse scaling) and
    the variable's backward (grad of point j = sum over its weights of alpha_bucket * g)."""
    s, alpha, beta = authors_scale(w, bs)
    flat = s.reshape(-1)
    idx = np.searchsorted(points, flat, side="left").clip(max=points.size - 1)
    mask = (idx > 0) & ((idx == len(points))
                        | (np.fabs(flat - points[idx - 1]) < np.fabs(flat - points[idx])))
    idx = idx - mask
    q = (points[idx].reshape(s.shape) * alpha + beta).reshape(-1)[:w.size].reshape(w.shape)
    mod = (authors_bucket(g, bs) * alpha).reshape(-1)[:g.size]
    grad = np.array([mod[idx[:g.size] == j].sum() for j in range(points.size)])
    return q, idx[:w.size].reshape(w.shape), grad


def ranged_weight(seed=0):
    """Three buckets of 256 with ranges 2e-3, 20 and 1 (offset 100), plus a 100-element tail."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.rand(256, generator=g) * 2e-3 - 1e-3, torch.rand(256, generator=g) * 20 - 10,
             torch.rand(256, generator=g) + 100, torch.randn(100, generator=g)]
    return torch.cat(parts).reshape(28, 31)


def test_buckets_with_very_different_ranges_use_all_levels():
    w = ranged_weight()
    q = PolinoDifferentiableQuantizer(2)  # paper defaults: buckets of 256
    out = q(w).detach().reshape(-1)
    for b in range(4):
        v = out[b * 256:(b + 1) * 256]
        assert v.unique().numel() == 4, f"bucket {b} uses {v.unique().numel()} of 4 levels"
        src = w.reshape(-1)[b * 256:(b + 1) * 256]
        assert float(v.min()) == pytest.approx(float(src.min()), abs=1e-6 * float(src.abs().max()))
        assert float(v.max()) == pytest.approx(float(src.max()), abs=1e-6 * float(src.abs().max()))
    assert float(q.points.detach().min()) == 0.0 and float(q.points.detach().max()) == 1.0
    # the named option (one bucket for the tensor) cannot: the small bucket collapses
    one = PolinoDifferentiableQuantizer(2, bucket_size=None)(w).detach().reshape(-1)
    assert one[:256].unique().numel() == 1


def test_forward_and_point_gradient_brute_force():
    w = ranged_weight(1).requires_grad_(True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    q = PolinoDifferentiableQuantizer(3)
    y = q(w)
    y.backward(g)
    p = q.points.detach().double()
    flat, gf = w.detach().reshape(-1).double(), g.reshape(-1).double()
    ref_y, ref_grad = torch.zeros_like(flat), torch.zeros(8, dtype=torch.float64)
    for b0 in range(0, flat.numel(), 256):  # brute force, bucket by bucket, element by element
        v = flat[b0:b0 + 256]
        lo, hi = float(v.min()), float(v.max())
        for i in range(b0, min(b0 + 256, flat.numel())):
            s = (float(flat[i]) - lo) / (hi - lo)
            j = int((p - s).abs().argmin())
            ref_y[i] = (hi - lo) * p[j] + lo
            ref_grad[j] += (hi - lo) * float(gf[i])
    torch.testing.assert_close(y.detach().reshape(-1).double(), ref_y, rtol=0, atol=1e-4)
    torch.testing.assert_close(q.points.grad.double(), ref_grad, rtol=1e-5, atol=1e-4)
    assert w.grad is None  # Algorithm 2 learns the points only
    w2 = w.detach().clone().requires_grad_(True)
    q2 = PolinoDifferentiableQuantizer(3, ste=True)
    q2(w2).backward(g)
    assert torch.equal(w2.grad, g)


@pytest.mark.parametrize("bits,bs,shape", [(2, 256, (28, 31)), (3, 256, (10, 7)),
                                            (4, 64, (28, 31)), (2, None, (28, 31))])
def test_matches_the_authors_code_path(bits, bs, shape):
    w = ranged_weight(3).reshape(-1)[:int(np.prod(shape))].reshape(shape)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    q = PolinoDifferentiableQuantizer(bits, bucket_size=bs)
    wn = w.double().numpy()
    q.initialize(w)
    np.testing.assert_allclose(q.points.detach().numpy(), authors_init(wn, bs, 2**bits),
                               rtol=0, atol=1e-6)
    with torch.no_grad():  # learned points, out of order (between a step and the re-sort)
        q.points.add_(torch.randn(2**bits, generator=torch.Generator().manual_seed(5)) * 0.05)
    wr = w.clone().requires_grad_(False)
    y = q(wr)
    y.backward(g)
    p_sorted, perm = q.points.detach().double().sort()
    ref_q, ref_idx, ref_grad = authors_forward_backward(wn, p_sorted.numpy(), bs, g.double().numpy())
    scale = float(w.abs().max())
    np.testing.assert_allclose(y.detach().double().numpy(), ref_q, rtol=0, atol=1e-6 * scale)
    assert torch.equal(q.assignments(w), perm[torch.from_numpy(ref_idx)])
    grad_sorted = q.points.grad.double()[perm].numpy()
    np.testing.assert_allclose(grad_sorted, ref_grad, rtol=1e-5, atol=1e-5 * scale)


def test_uniform_init_resort_storage_and_bad_config():
    w = ranged_weight()
    q = PolinoDifferentiableQuantizer(2, init="uniform")
    q(w)
    assert q.points.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with torch.no_grad():
        q.points.copy_(torch.tensor([0.9, 0.1, 0.5, 0.0]))
    before = q(w).detach().clone()
    q.resort()
    assert q.points.tolist() == pytest.approx([0.0, 0.1, 0.5, 0.9])
    assert torch.equal(q(w).detach(), before)
    assert q.storage_bits(w) == 2 * 868 + 4 * 32 + 4 * 64  # codes + points + alpha, beta
    assert PolinoDifferentiableQuantizer(2, bucket_size=None).storage_bits(w) == 2 * 868 + 4 * 32 + 64
    for kw, match in ((dict(bucket_size=0), "bucket_size"), (dict(init="kmeans"), "init")):
        with pytest.raises(ConfigError, match=match):
            PolinoDifferentiableQuantizer(2, **kw)


@pytest.mark.parametrize("bs,fmt", [(256, "bucketed"), (None, "lut")])
def test_packed_weight_is_bit_exact(bs, fmt):
    torch.manual_seed(0)
    lin = nn.Linear(96, 10)
    with torch.no_grad():
        lin.weight[:3] *= 100  # buckets of very different ranges
    q = PolinoDifferentiableQuantizer(3, bucket_size=bs)
    q(lin.weight)
    with torch.no_grad():
        q.points.mul_(0.9).add_(0.03)
    p = PF.pack_weight(lin.weight, q, "lin", lin.bias, "torch", torch.float32)
    assert p.fmt == fmt
    assert torch.equal(p.dequantize(), q(lin.weight).detach())
    x = torch.randn(4, 96)
    torch.testing.assert_close(p(x), x @ q(lin.weight).detach().t() + lin.bias)
