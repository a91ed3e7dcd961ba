"""Simulated FP8 training (Wang 2018): FP8 forward / E5M2 backward quantizer against torch's
float8 casts; chunk-based FP16 accumulation against numpy float16 loops and fp64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.fp8_training import FP8TrainingQuantizer, chunked_matmul, sequential_matmul


def e5m2(x):
    return x.to(torch.float8_e5m2).float()


def test_forward_and_backward_rounding_match_torch_float8_casts():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=g) * 10).requires_grad_(True)
    grad = torch.randn(200, generator=g) * torch.logspace(-8, 2, 200)
    q = FP8TrainingQuantizer(grad_at="gemm_outputs")  # the quantizer rounds its gradient
    y = q(x)
    assert torch.equal(y, e5m2(x.detach()))
    y.backward(grad)
    assert torch.equal(x.grad, e5m2(grad))
    assert (x.grad[:40] == 0).any()  # tiny gradients flush to zero in E5M2 (why loss scaling)
    # e4m3 forward saturates at 448: clipped straight-through gradient there
    x2 = torch.tensor([1.0, 500.0, -3.3], requires_grad=True)
    y2 = FP8TrainingQuantizer(fmt="e4m3", grad_at="gemm_outputs")(x2)
    assert torch.equal(y2, x2.detach().to(torch.float8_e4m3fn).float())
    y2.backward(torch.tensor([0.3, 0.3, 0.3]))
    assert torch.equal(x2.grad, torch.tensor([1.0, 0.0, 1.0]) * e5m2(torch.tensor([0.3] * 3)))


def test_gemm_outputs_option_rounds_weight_and_input_gradients():
    torch.manual_seed(0)
    lin = QuantLinear.from_float(torch.nn.Linear(8, 4), FP8TrainingQuantizer(grad_at="gemm_outputs"),
                                 FP8TrainingQuantizer(grad_at="gemm_outputs"))
    x = torch.randn(5, 8, requires_grad=True)
    lin(x).pow(2).sum().backward()
    assert torch.equal(lin.weight.grad, e5m2(lin.weight.grad))
    assert torch.equal(x.grad, e5m2(x.grad))
    # the weight gradient is the E5M2 rounding of the gradient at the FP8 weight and input
    wq, xq = e5m2(lin.weight.detach()).requires_grad_(True), e5m2(x.detach())
    torch.nn.functional.linear(xq, wq, lin.bias.detach()).pow(2).sum().backward()
    assert torch.equal(lin.weight.grad, e5m2(wq.grad))


def test_bad_options():
    with pytest.raises(ValueError, match="fmt"):
        FP8TrainingQuantizer(fmt="fp16")
    with pytest.raises(ValueError, match="grad_rounding"):
        FP8TrainingQuantizer(grad_rounding="up")
    with pytest.raises(ValueError, match="bits"):
        FP8TrainingQuantizer(bits=4)
    with pytest.raises(ValueError, match="chunk"):
        chunked_matmul(torch.ones(2, 3), torch.ones(3, 2), chunk=0)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        chunked_matmul(torch.ones(2, 3), torch.ones(2, 2))


def numpy_fp16_chunked(a, b, chunk):
    """Independent reference: scalar loops in numpy float16 (IEEE round to nearest even)."""
    m, k = a.shape
    out = np.zeros((m, b.shape[1]), dtype=np.float16)
    for i in range(m):
        for j in range(b.shape[1]):
            acc = np.float16(0)
            for s in range(0, k, chunk):
                part = np.float16(0)
                for t in range(s, min(s + chunk, k)):
                    part = np.float16(np.float64(part) + np.float64(np.float16(a[i, t] * b[t, j])))
                acc = np.float16(np.float64(acc) + np.float64(part))
            out[i, j] = acc
    return out.astype(np.float32)


def test_chunked_matmul_equals_numpy_float16_loops():
    g = torch.Generator().manual_seed(1)
    a, b = e5m2(torch.rand(3, 300, generator=g)), e5m2(torch.rand(300, 2, generator=g))
    ref = numpy_fp16_chunked(a.double().numpy(), b.double().numpy(), 64)
    assert np.array_equal(chunked_matmul(a, b, chunk=64).numpy(), ref)
    ref_seq = numpy_fp16_chunked(a.double().numpy(), b.double().numpy(), 300)
    assert np.array_equal(sequential_matmul(a, b).numpy(), ref_seq)


def test_chunked_accumulation_avoids_swamping_on_long_dot_products():
    g = torch.Generator().manual_seed(2)
    k = 8192
    x = e5m2(torch.rand(2, k, generator=g))
    w = e5m2(torch.rand(k, 1, generator=g))
    exact = (x.double() @ w.double()).squeeze(1)
    chunked = chunked_matmul(x, w, chunk=64).double().squeeze(1)
    naive = sequential_matmul(x, w).double().squeeze(1)
    err_c = ((chunked - exact).abs() / exact).max().item()
    err_n = ((naive - exact).abs() / exact).max().item()
    assert err_c < 5e-3  # a few FP16 ulps (eps = 2^-10) over 256 chunk adds
    assert err_n > 0.15  # the running sum stalls once its ulp/2 exceeds the addends
    assert err_n > 50 * err_c
