"""Polino 2018 bucketed min-max quantizer: brute-force reference, STE update of the float copy."""

from __future__ import annotations

import math

import pytest
import torch

from qtrain.nn.bucket_quantizer import BucketUniformQuantizer
from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer


def brute_force(x, bits, bucket):
    flat = x.flatten().tolist()
    out = []
    for start in range(0, len(flat), bucket):
        v = flat[start:start + bucket]
        lo, hi = min(v), max(v)
        grid = [lo + (hi - lo) * k / (2**bits - 1) for k in range(2**bits)]
        out += [min(grid, key=lambda g, e=e: abs(g - e)) for e in v]
    return torch.tensor(out).reshape(x.shape)


@pytest.mark.parametrize("bits,bucket,shape", [(2, 64, (3, 100)), (4, 256, (16, 16, 3, 3)), (1, 7, (5, 5))])
def test_matches_brute_force_per_bucket(bits, bucket, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    q = BucketUniformQuantizer(bits, bucket_size=bucket)
    torch.testing.assert_close(q(x), brute_force(x, bits, bucket), atol=1e-5, rtol=0)


def test_bucket_range_is_exact_min_max_unlike_uniform_group():
    # an all-positive bucket: Polino keeps min and max exactly; the affine UniformQuantizer widens
    # its range to contain 0, so its grid differs (why a separate quantizer exists)
    x = torch.linspace(1.0, 2.0, 256).reshape(1, 256)
    y = BucketUniformQuantizer(2, bucket_size=256)(x)
    assert y.min().item() == 1.0 and y.max().item() == 2.0
    assert len(set(y.flatten().tolist())) == 4
    u = UniformQuantizer(2, symmetric=False, granularity="group", group_size=256)(x)
    assert not torch.allclose(u, y)
    with pytest.raises(ValueError, match="does not divide"):  # per-row groups of 256: 144 % 256
        UniformQuantizer(4, symmetric=False, granularity="group", group_size=256)(torch.randn(16, 16, 3, 3))


def test_storage_bits_and_bad_input():
    w = torch.randn(16, 16, 3, 3)  # 2304 elements = 9 buckets
    assert BucketUniformQuantizer(4).storage_bits(w) == 4 * 2304 + 64 * 9
    assert BucketUniformQuantizer(4).storage_bits(torch.randn(300)) == 4 * 300 + 64 * 2
    with pytest.raises(ValueError, match="bucket_size"):
        BucketUniformQuantizer(4, bucket_size=0)
    with pytest.raises(ValueError, match="rounding"):
        BucketUniformQuantizer(4, rounding="truncate")
    with pytest.raises(ValueError, match="bits"):
        BucketUniformQuantizer(0)


def test_stochastic_rounding_unbiased():
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    q = BucketUniformQuantizer(2, bucket_size=64, rounding="stochastic", seed=0)
    mean = torch.stack([q(x) for _ in range(1000)]).mean(0)
    step = (x.max() - x.min()).item() / 3
    assert (mean - x).abs().max().item() < 0.12 * step  # std of the mean <= step / 2 / sqrt(1000)
    assert not torch.equal(q(x), q(x))


def test_quantized_distillation_step_updates_float_copy():
    """Polino Algorithm 1: forward/backward through Q(W), SGD update applied to the float W."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 4)
    w0 = lin.weight.detach().clone()
    q = BucketUniformQuantizer(2, bucket_size=256)
    layer = QuantLinear.from_float(lin, q, None)
    x = torch.randn(8, 300)
    (layer(x) ** 2).sum().backward()
    # reference: the gradient w.r.t. the quantized weight as a leaf
    wq = brute_force(w0, 2, 256).requires_grad_(True)
    (torch.nn.functional.linear(x, wq, lin.bias.detach()) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad, atol=1e-4, rtol=1e-4)
    torch.optim.SGD(layer.parameters(), lr=0.01).step()
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.01 * wq.grad, atol=1e-5, rtol=1e-5)
    assert not torch.equal(layer.weight.detach(), brute_force(layer.weight.detach(), 2, 256))
    assert math.isfinite(layer.weight.sum().item())
