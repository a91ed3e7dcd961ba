"""The same kernels compiled on a GPU (bf16 included), vs torch references; CUDA only."""

import pytest
import torch
from qtrain_kernels.codebook_matmul import codebook_linear, codebook_linear_reference
from qtrain_kernels.layout import pack_codes
from qtrain_kernels.lowbit_matmul import lowbit_linear, lowbit_linear_reference
from qtrain_kernels.w8a8 import w8a8_linear, w8a8_linear_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("m", [1, 5, 16, 64, 257])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowbit_gpu(m, bits, dtype):
    n, k, g = 333, 1024, 128
    u = torch.randint(0, 2**bits, (n, k), device="cuda")
    s = (torch.rand(n, k // g, device="cuda") * 0.01).half()
    z = torch.randint(0, 2**bits, (n, k // g), device="cuda", dtype=torch.uint8)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    packed = pack_codes(u, bits)
    y = lowbit_linear(x, packed, s, z, bits=bits, k=k)
    ref = lowbit_linear_reference(x, packed, s, z, bits=bits, k=k)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_codebook_and_w8a8_gpu():
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    codes = torch.randint(0, 256, (300, 64), device="cuda", dtype=torch.uint8)
    cents = torch.randn(256, 8, device="cuda", dtype=torch.float16) * 0.05
    torch.testing.assert_close(codebook_linear(x, codes, cents),
                               codebook_linear_reference(x, codes, cents), rtol=2e-2, atol=2e-2)
    qw = torch.randint(-127, 128, (300, 512), device="cuda", dtype=torch.int8)
    sw = torch.rand(300, device="cuda") * 0.01
    torch.testing.assert_close(w8a8_linear(x, qw, sw), w8a8_linear_reference(x, qw, sw),
                               rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture():
    k, n = 1024, 512
    packed = pack_codes(torch.randint(0, 16, (n, k), device="cuda"), 4)
    s = torch.full((n, k // 128), 0.01, device="cuda", dtype=torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    y0 = lowbit_linear(x, packed, s, bits=4, k=k, zero=8.0)  # tunes before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = lowbit_linear(x, packed, s, bits=4, k=k, zero=8.0)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y0)
