"""Lookup-table weights, float zero-points and every scale-sharing regime of the low-bit
kernel, under the Triton interpreter, against references built from the drawn codes.

The kernels apply a group's scale after the product when a K block lies in one group, per
group when groups tile the block, and per element otherwise (``group_span``); each regime is
forced here with explicit block sizes, for the GEMV (M <= 8) and the GEMM kernel.
Tolerances as in test_lowbit_kernels.py (fp32 1e-4, fp16 1e-2 relative to max|y|).
"""

import pytest
import torch

from qtrain_kernels.layout import container_bits, dequantize_uniform, pack_codes
from qtrain_kernels.lowbit_matmul import group_span, lowbit_linear


def _close(y, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1.0), err


def _x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_group_span_regimes():
    assert group_span(64, 128, False) == 64   # block inside one group: scale after the dot
    assert group_span(64, 64, False) == 64
    assert group_span(64, 16, False) == 16    # groups tile the block
    assert group_span(32, 24, False) == 1     # neither: one scale per element
    assert group_span(32, 72, True) == 32     # per channel: one group per row


@pytest.mark.parametrize(
    ("m", "n", "k", "bits", "g", "bk", "dtype"),
    [
        (1, 9, 128, 4, 64, 32, torch.float32),   # GEMV, group spans 2 blocks
        (2, 7, 72, 4, 24, 32, torch.float32),    # GEMV, per-element scales (24 vs 32)
        (1, 5, 128, 2, 32, 64, torch.float16),   # GEMV, 2 groups per block
        (1, 6, 96, 8, 96, 64, torch.float32),    # GEMV per channel, K tail in the block
        (20, 9, 128, 4, 64, 32, torch.float32),  # GEMM, scale after the dot
        (17, 7, 72, 4, 24, 32, torch.float16),   # GEMM, per-element scales
        (18, 5, 128, 2, 32, 64, torch.float32),  # GEMM, 2 groups per block
        (19, 3, 100, 8, 100, 32, torch.float16),  # GEMM per channel, K = 100
    ],
)
def test_scale_regimes_float_zero_points(m, n, k, bits, g, bk, dtype):
    """Asymmetric codes with float16 zero-points that are not whole numbers (DSQ / bucket
    min-max offsets): W = (u - z) * s."""
    gen = torch.Generator().manual_seed(k + bits)
    u = torch.randint(0, 2**bits, (n, k), generator=gen)
    s = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).half()
    z = (torch.rand(n, k // g, generator=gen) * (2**bits - 1)).half()
    w = (u - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    x = _x(m, k, dtype)
    cfg = ({"BLOCK_N": 16, "BLOCK_K": bk, "SPLIT_K": 2} if m <= 8 else
           {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": bk, "SPLIT_K": 1})
    y = lowbit_linear(x, pack_codes(u, bits), s, z, bits=bits, k=k, config=cfg)
    _close(y, x.double() @ w.to(dtype).double().t(), dtype)


def test_dorefa_half_integer_zero():
    """DoReFa k-bit weights w = 2u/(2^k - 1) - 1 = (u - (2^k-1)/2) * 2/(2^k-1): the implied
    constant zero-point is a half integer."""
    bits, n, k = 3, 11, 40
    u = torch.randint(0, 8, (n, k), generator=torch.Generator().manual_seed(3))
    s = torch.full((n, 1), 2 / 7)
    x = _x(4, k, torch.float32)
    y = lowbit_linear(x, pack_codes(u, bits), s, bits=bits, k=k, zero=3.5)
    _close(y, x.double() @ (2 * u.double() / 7 - 1).t(), torch.float32)


@pytest.mark.parametrize(
    ("m", "n", "k", "bits", "rows", "g", "dtype"),
    [
        (1, 13, 64, 2, 1, 64, torch.float32),    # TTQ-style per-tensor table, GEMV
        (3, 9, 96, 4, 9, 32, torch.float16),     # per-row tables, grouped scales, GEMV
        (21, 11, 64, 2, 1, 64, torch.float32),   # GEMM, per-tensor table
        (18, 7, 48, 3, 7, 16, torch.float32),    # GEMM, 3-bit codes in 4-bit containers
    ],
)
def test_lut_mode(m, n, k, bits, rows, g, dtype):
    gen = torch.Generator().manual_seed(m * 7 + bits)
    size = 2 ** container_bits(bits)
    u = torch.randint(0, 2**bits, (n, k), generator=gen)
    lut = torch.randn(rows, size, generator=gen).half()
    s = (torch.rand(n, k // g, generator=gen) + 0.5).half()
    # brute force: look every code up in its row's table
    table = lut.float().expand(n, -1)
    w = torch.stack([torch.tensor([table[i, int(u[i, j])] for j in range(k)])
                     for i in range(n)]) * s.float().repeat_interleave(g, 1)
    x = _x(m, k, dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    cfg = ({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1} if m <= 8 else
           {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2})
    packed = pack_codes(u, bits)
    y = lowbit_linear(x, packed, s, None, bias, bits=bits, k=k, mode="lut", lut=lut, config=cfg)
    _close(y, x.double() @ w.to(dtype).double().t() + bias.double(), dtype)
    ref_w = dequantize_uniform(packed, s, None, bits, k, "lut", lut=lut)
    assert torch.equal(ref_w, w)


def test_lut_bad_input():
    packed = pack_codes(torch.zeros(4, 64, dtype=torch.long), 2)
    s = torch.ones(4, 1)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="mode='lut' needs lut="):
        lowbit_linear(x, packed, s, bits=2, k=64, mode="lut")
    with pytest.raises(ValueError, match=r"lut has shape \(2, 4\).*expected \(1, 4\) or \(4, 4\)"):
        lowbit_linear(x, packed, s, bits=2, k=64, mode="lut", lut=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lut is only used with mode='lut'"):
        lowbit_linear(x, packed, s, bits=2, k=64, lut=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="BLOCK_K=8 must be a multiple of 16"):
        lowbit_linear(x, packed, s, bits=2, k=64,
                      config={"BLOCK_N": 16, "BLOCK_K": 8, "SPLIT_K": 1})
