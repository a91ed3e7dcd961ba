"""Chunk-based FP16 accumulation inside Linear / Conv2d (Wang 2018 sec. 3.1) for simulated
FP8 training: against brute-force chunk loops with explicit numpy float16 rounding of the
running sum, against per-channel-chunk F.conv2d, and a hand-built swamping case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.fp8_training import (
    ChunkedAccumulation,
    FP8TrainingQuantizer,
    chunked_conv2d,
    chunked_gemm,
    chunked_linear,
)
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture


def e5m2(x):
    return x.to(torch.float8_e5m2).float()


def fp8_operand(*shape, seed):
    """E5M2 values with |v| in [2^-4, 1]: every chunk's FP32 partial sum is exact, so a
    float64 reference partial rounds to float16 identically."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(*shape, generator=g) * 0.9375 + 0.0625
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return e5m2(v * sign)


def loop_reference(a, b, chunk):
    """Brute force: a (M, K) @ b (K, N); per chunk of K an exact (float64) partial rounded to
    float16, running sum rounded to float16 after every add; Python loops over chunks."""
    a, b = a.double().numpy(), b.double().numpy()
    k = a.shape[1]
    acc = np.zeros((a.shape[0], b.shape[1]), dtype=np.float16)
    for s in range(0, k, chunk):
        part = (a[:, s:s + chunk] @ b[s:s + chunk, :]).astype(np.float16)
        acc = (acc.astype(np.float64) + part.astype(np.float64)).astype(np.float16)
    return torch.from_numpy(acc.astype(np.float32))


def test_chunked_linear_equals_chunk_loop_with_fp16_running_sum():
    x, w = fp8_operand(2, 5, 200, seed=0), fp8_operand(7, 200, seed=1)
    bias = torch.randn(7)
    out = chunked_linear(x, w, bias, chunk=64)
    ref = loop_reference(x.reshape(10, 200), w.t(), 64).reshape(2, 5, 7) + bias
    assert torch.equal(out, ref)
    # K <= chunk: a single FP32 GEMM rounded once to fp16
    assert torch.equal(chunked_linear(x, w, chunk=256), F.linear(x, w).half().float())
    assert not torch.equal(chunked_linear(x, w, chunk=64), F.linear(x, w))  # fp16 values


def test_swamping_chunked_running_sum_differs_from_fp32():
    # chunk 0: 4096 + 63/64 -> fp16 4096 (ulp 4); chunks 1..19 each add 64 * 1/64 = 1 < ulp/2,
    # so the fp16 running sum stays 4096; FP32 accumulation gives 4096 + 19 + 63/64
    k = 64 * 20
    x = torch.full((1, k), 1 / 64)
    x[0, 0] = 4096.0
    w = torch.ones(1, k)
    exact = 4096 + 19 + 63 / 64
    assert F.linear(x, w).item() == exact
    assert chunked_linear(x, w, chunk=64).item() == 4096.0
    assert loop_reference(x, w.t(), 64).item() == 4096.0
    # one chunk (FP32 inside, one rounding): no swamping, fp16(4115.98) = 4116
    assert chunked_linear(x, w, chunk=k).item() == 4116.0
    # bf16 accumulator (8 significand bits): swamped already at 4096 + 16
    assert chunked_linear(x, w, chunk=64, acc_dtype=torch.bfloat16).item() == 4096.0


def test_chunked_linear_backward_is_chunked_too():
    x = fp8_operand(150, 40, seed=2).requires_grad_(True)
    w = fp8_operand(90, 40, seed=3).requires_grad_(True)
    g = fp8_operand(150, 90, seed=4)
    chunked_linear(x, w, chunk=32).backward(g)
    # error: reduction over out_features (90 -> chunks 32, 32, 26); weight gradient:
    # reduction over the 150 rows (chunks 32 x 4 + 22)
    assert torch.equal(x.grad, loop_reference(g, w.detach(), 32))
    assert torch.equal(w.grad, loop_reference(g.t(), x.detach(), 32))
    # and close to the FP32 autograd gradients
    x2, w2 = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    F.linear(x2, w2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=4e-3, atol=2e-2)  # a few fp16 ulps
    torch.testing.assert_close(w.grad, w2.grad, rtol=4e-3, atol=2e-2)


def conv_channel_chunk_reference(x, w, chunk_channels, groups=1, **kw):
    """Independent reference: F.conv2d over slices of chunk_channels input channels (one
    im2col chunk = chunk_channels * kh * kw terms), fp16 running sum, per group."""
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    outs = []
    for gi in range(groups):
        xs = x[:, gi * cin_g:(gi + 1) * cin_g]
        ws = w[gi * cout_g:(gi + 1) * cout_g]
        acc = None
        for c in range(0, cin_g, chunk_channels):
            part = F.conv2d(xs[:, c:c + chunk_channels].double(),
                            ws[:, c:c + chunk_channels].double(), **kw).half()
            acc = part if acc is None else (acc.double() + part.double()).half()
        outs.append(acc.float())
    return torch.cat(outs, 1)


@pytest.mark.parametrize(("groups", "chunk_channels"), [(1, 2), (1, 3), (2, 3)])
def test_chunked_conv2d_equals_input_channel_chunk_loop(groups, chunk_channels):
    x = fp8_operand(2, 8, 9, 7, seed=5).requires_grad_(True)
    w = fp8_operand(6, 8 // groups, 3, 3, seed=6).requires_grad_(True)
    bias = torch.randn(6)
    kw = dict(stride=2, padding=1, dilation=1)
    # a chunk of 9 * c terms = c input channels of the 3x3 kernel (c = 3: a shorter last chunk)
    out = chunked_conv2d(x, w, bias, groups=groups, chunk=9 * chunk_channels, **kw)
    ref = conv_channel_chunk_reference(x.detach(), w.detach(), chunk_channels, groups, **kw)
    assert torch.equal(out, ref + bias.view(1, -1, 1, 1))
    # backward: close to FP32 autograd; weight gradient chunked over output positions
    gout = fp8_operand(*out.shape, seed=7)
    out.backward(gout)
    x2, w2 = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    F.conv2d(x2, w2, bias, groups=groups, **kw).backward(gout)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=2e-2)
    if groups == 1:
        assert torch.equal(w.grad, weight_grad_reference(x.detach(), gout, w.shape, 9 * chunk_channels, **kw))


def weight_grad_reference(x, gout, wshape, chunk, **kw):
    """Brute force: per sample, chunks of `chunk` consecutive output positions, exact
    (float64) partial rounded to float16, float16 running sum in sample order."""
    cols = F.unfold(x.double(), wshape[-2:], kw["dilation"], kw["padding"], kw["stride"])
    g = gout.double().flatten(2)
    acc = torch.zeros(wshape[0], cols.shape[1], dtype=torch.float16)
    for b in range(x.shape[0]):
        for s in range(0, g.shape[2], chunk):
            part = (g[b, :, s:s + chunk] @ cols[b, :, s:s + chunk].t()).half()
            acc = (acc.double() + part.double()).half()
    return acc.float().reshape(wshape)


def test_fake_quant_layers_use_chunked_path_from_quantizer_option():
    torch.manual_seed(0)
    opts = dict(accumulation="chunked", chunk_size=16)
    lin = QuantLinear.from_float(torch.nn.Linear(40, 6), FP8TrainingQuantizer(**opts),
                                 FP8TrainingQuantizer())
    x = torch.randn(4, 40, requires_grad=True)
    y = lin(x)
    assert type(y) is torch.Tensor  # the subclass does not leak out of the layer
    xq, wq = e5m2(x.detach()), e5m2(lin.weight.detach())
    assert torch.equal(y, chunked_linear(xq, wq, lin.bias, chunk=16))
    assert not torch.equal(y, F.linear(xq, wq, lin.bias))
    y.sum().backward()  # error = ones (exact in E5M2): dW is the chunked GEMM of 1 and X_8
    assert torch.equal(lin.weight.grad, chunked_gemm(torch.ones(4, 6).t(), xq, chunk=16))
    conv = QuantConv2d.from_float(torch.nn.Conv2d(4, 5, 3, padding=1),
                                  FP8TrainingQuantizer(**opts), FP8TrainingQuantizer())
    xi = torch.randn(2, 4, 6, 6)
    xiq, cwq = e5m2(xi), e5m2(conv.weight.detach())
    assert torch.equal(conv(xi), chunked_conv2d(xiq, cwq, conv.bias, padding=1, chunk=16))
    # disabled quantizer (FP32 phase): plain FP32 F.linear, no chunking
    lin.weight_quantizer.enabled = lin.act_quantizer.enabled = False
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    # any other op on the view returns plain tensors
    v = ChunkedAccumulation.wrap(torch.ones(3), 64, torch.float16)
    assert type(v * 2) is torch.Tensor and type(v.detach()) is torch.Tensor


def test_bad_chunked_options():
    with pytest.raises(ValueError, match="accumulation"):
        FP8TrainingQuantizer(accumulation="fp16")
    with pytest.raises(ValueError, match="chunk_size"):
        FP8TrainingQuantizer(accumulation="chunked", chunk_size=0)
    with pytest.raises(ValueError, match="acc_dtype"):
        FP8TrainingQuantizer(acc_dtype="fp8")
    with pytest.raises(ValueError, match=r"\(..., P, K\)"):
        chunked_gemm(torch.ones(1, 2, 3), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        chunked_linear(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(ValueError, match="padding"):
        chunked_conv2d(torch.ones(1, 2, 4, 4), torch.ones(2, 2, 3, 3), padding="same")


def test_recipe_config_selects_chunked_accumulation(tmp_path):
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["recipe=fp8_training_resnet20_cifar10", "debug=smoke"], tmp_path)
    wq = instantiate(cfg.quant).weight_factory(bits=8)
    assert (wq.accumulation, wq.chunk_size, wq.acc_dtype) == ("chunked", 64, "fp16")
    cfg = compose_cfg(["recipe=fp8_training_resnet20_cifar10", "debug=smoke",
                       "quant.weight.accumulation=fp32"], tmp_path)
    assert instantiate(cfg.quant).weight_factory(bits=8).accumulation == "fp32"
