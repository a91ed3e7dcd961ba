"""Every kernel under the Triton interpreter (CPU) vs an independent torch reference.

References are built from the unpacked codes the test drew itself (not from the packed
tensors), so packing, unpacking and dequantization inside the kernel are all checked.
Tolerances: fp32 activations 1e-4 relative to max|y| (summation order differs); fp16
activations 1e-2 (the kernel rounds W_hat to fp16 before the product, the reference too, but
fp16 output rounding and fp32 summation order differ).
"""

import pytest
import torch

from qtrain_kernels.bitserial import bitserial_matmul
from qtrain_kernels.codebook_matmul import codebook_linear
from qtrain_kernels.layout import container_bits, pack_bitplanes, pack_codes
from qtrain_kernels.lowbit_matmul import lowbit_linear
from qtrain_kernels.w8a8 import w8a8_linear

GEMV = {"BLOCK_N": 16, "BLOCK_K": 32}
GEMM = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def _close(y, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1.0), err


def _uniform_case(n, k, bits, g, sym, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    c = container_bits(bits)
    u = torch.randint(0, 2**bits, (n, k), generator=gen)
    s = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    z = None if sym else torch.randint(0, 2**bits, (n, k // g), generator=gen)
    zero = 2 ** (bits - 1) if sym else 0
    se = s.half().float().repeat_interleave(g, 1)
    if mode == "binary":
        w = (2 * u - 1) * se
    else:
        w = (u - (zero if z is None else z.repeat_interleave(g, 1))) * se
    zeros = None if z is None else z.to(torch.uint8)
    return pack_codes(u, c), s.half(), zeros, zero, w


@pytest.mark.parametrize(
    ("m", "n", "k", "bits", "g", "sym", "mode", "dtype", "split"),
    [
        (1, 19, 96, 4, 32, False, "affine", torch.float32, 1),   # int4 g32 asym GEMV
        (3, 21, 64, 4, 64, True, "affine", torch.float16, 2),    # int4 sym, split-K
        (1, 17, 80, 2, 16, False, "affine", torch.float32, 3),   # int2 asym, K tail in split
        (5, 13, 72, 8, 72, True, "affine", torch.float32, 1),    # int8 per-channel
        (2, 9, 70, 3, 70, False, "affine", torch.float32, 1),    # 3-bit in 4-bit containers
        (1, 11, 66, 1, 66, True, "binary", torch.float32, 2),    # binary, K % 32 != 0
        (17, 19, 96, 4, 32, False, "affine", torch.float32, 1),  # GEMM, odd M tail
        (33, 21, 64, 2, 32, True, "affine", torch.float16, 2),   # GEMM int2 fp16 split-K
        (19, 7, 40, 8, 8, False, "affine", torch.float32, 1),    # GEMM int8 g8
        (18, 5, 33, 1, 33, True, "binary", torch.float32, 1),    # GEMM binary, odd K
    ],
)
def test_lowbit_linear(m, n, k, bits, g, sym, mode, dtype, split):
    packed, s, zeros, zero, w = _uniform_case(n, k, bits, g, sym, mode, seed=m * 31 + n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    cfg = {**(GEMV if m <= 8 else GEMM), "SPLIT_K": split}
    y = lowbit_linear(x, packed, s, zeros, bias, bits=bits, k=k, mode=mode, zero=zero,
                      config=cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ w.to(dtype).double().t() + bias.double()
    _close(y, ref, dtype)


def test_lowbit_linear_ternary_batched_default_config():
    # ternary: t in {-1,0,1} as u = t + 1, implied zero 1; 3-D input, autotune disabled path
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(-1, 2, (6, 40), generator=gen)
    alpha = torch.rand(6, 1, generator=gen) + 0.5
    x = torch.randn(2, 3, 40, generator=gen)
    y = lowbit_linear(x, pack_codes(t + 1, 2), alpha, None, bits=2, k=40, zero=1.0)
    ref = x @ (t * alpha).t()
    _close(y, ref, torch.float32)


@pytest.mark.parametrize(("m", "n", "kc", "bs", "dtype"),
                         [(1, 19, 5, 8, torch.float32), (3, 7, 9, 4, torch.float16),
                          (17, 21, 7, 9, torch.float32),   # bs 9: per-element gathers
                          (18, 11, 9, 8, torch.float16),   # GEMM, one code load per block
                          (2, 5, 3, 64, torch.float32),    # bs > BLOCK_K: per element
                          (20, 6, 5, 16, torch.float32)])  # GEMM, K tail inside a block
def test_codebook_linear(m, n, kc, bs, dtype):
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 256, (n, kc), generator=gen)
    cents = torch.randn(256, bs, generator=gen).half()
    w = torch.stack([torch.cat([cents[codes[i, j]].float() for j in range(kc)])
                     for i in range(n)])  # brute-force block-by-block reconstruction
    x = torch.randn(m, kc * bs, generator=gen).to(dtype)
    y = codebook_linear(x, codes.to(torch.uint8), cents)
    _close(y, x.double() @ w.to(dtype).double().t(), dtype)


@pytest.mark.parametrize(("m", "n", "k", "dtype"),
                         [(1, 19, 70, torch.float32), (17, 21, 45, torch.float16)])
def test_w8a8_linear(m, n, k, dtype):
    gen = torch.Generator().manual_seed(k)
    qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    sw = torch.rand(n, generator=gen) * 0.01
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = w8a8_linear(x, qw, sw)
    # independent reference: per-token absmax scale, round half away from zero, exact int sums
    xf = x.double()
    sx = xf.abs().amax(1, keepdim=True) / 127
    qx = torch.sign(xf / sx) * torch.floor((xf / sx).abs() + 0.5)
    ref = (qx @ qw.double().t()) * sx * sw.double()
    _close(y, ref, dtype)
    # and close to the float product (quantization error only)
    exact = xf @ (qw.double() * sw.double()[:, None]).t()
    assert (y.double() - exact).abs().max() < 0.03 * exact.abs().max()


@pytest.mark.parametrize(("m", "n", "k", "abits", "wbits"),
                         [(3, 5, 70, 2, 1), (5, 9, 33, 3, 2), (2, 3, 40, 4, 4)])
def test_bitserial_popcount(m, n, k, abits, wbits):
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(0, 2**abits, (m, k), generator=gen)
    u = torch.randint(0, 2**wbits, (n, k), generator=gen)
    xp, wp = pack_bitplanes(a, abits), pack_bitplanes(u, wbits)
    # raw integer dot product equals the brute-force integer matmul exactly
    assert torch.equal(bitserial_matmul(xp, wp, k).long(), a @ u.t())
    # DoReFa maps: x = a / (2^k - 1), w = 2u / (2^m - 1) - 1
    y = bitserial_matmul(xp, wp, k, x_scale=1 / (2**abits - 1), w_scale=2 / (2**wbits - 1),
                         w_zero=(2**wbits - 1) / 2)
    ref = (a.double() / (2**abits - 1)) @ (2 * u.double() / (2**wbits - 1) - 1).t()
    assert (y.double() - ref).abs().max() < 1e-4


def test_kernel_bad_input():
    packed = pack_codes(torch.zeros(4, 64, dtype=torch.long), 4)
    s = torch.ones(4, 2, dtype=torch.float16)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        lowbit_linear(x.long(), packed, s, bits=4, k=64)
    with pytest.raises(ValueError, match="expected last dimension K=64"):
        lowbit_linear(torch.randn(2, 63), packed, s, bits=4, k=64)
    with pytest.raises(ValueError, match=r"packed has shape \(4, 8\); expected \(\*, 9\)"):
        lowbit_linear(torch.randn(2, 72), packed, s, bits=4, k=72)
    with pytest.raises(ValueError, match="3 groups per row; it must divide K=64"):
        lowbit_linear(x, packed, torch.ones(4, 3, dtype=torch.float16), bits=4, k=64)
    with pytest.raises(ValueError, match="zeros has dtype torch.int32"):
        lowbit_linear(x, packed, s, torch.zeros(4, 2, dtype=torch.int32), bits=4, k=64)
    with pytest.raises(ValueError, match=r"scales is not contiguous \(strides \(0, 1\)\)"):
        lowbit_linear(x, packed, torch.ones(1, 2, dtype=torch.float16).expand(4, 2), bits=4, k=64)
    with pytest.raises(ValueError, match="centroids is not contiguous"):
        codebook_linear(x, torch.zeros(3, 8, dtype=torch.uint8), torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="mode='x'"):
        lowbit_linear(x, packed, s, bits=4, k=64, mode="x")
    with pytest.raises(ValueError, match="qweight has dtype torch.float32"):
        w8a8_linear(x, torch.zeros(3, 64), torch.ones(3))
    with pytest.raises(ValueError, match="codes has dtype torch.int64"):
        codebook_linear(x, torch.zeros(3, 8, dtype=torch.long), torch.zeros(4, 8))
