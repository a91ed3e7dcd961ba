"""The same kernels compiled on a GPU (bf16 included), vs torch references; CUDA only."""

import pytest
import torch

from qtrain_kernels.codebook_matmul import codebook_linear, codebook_linear_reference
from qtrain_kernels.layout import pack_codes
from qtrain_kernels.lowbit_matmul import lowbit_linear, lowbit_linear_reference
from qtrain_kernels.w8a8 import w8a8_linear, w8a8_linear_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Correctness at the default and explicit configs; tuning belongs to the benchmark
    (autotuning every case here would compile hundreds of variants)."""
    monkeypatch.setenv("QTRAIN_AUTOTUNE", "0")


# one per scale regime of the kernels (see group_span): block in one group, groups tiling the
# block, and, for the GEMM, a block larger than the group
CONFIGS = [
    None,
    {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
     "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 8,
     "num_stages": 2},
]


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


@pytest.mark.parametrize("m", [1, 7, 48])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("mode", ["lut", "float_zero"])
def test_lowbit_modes_gpu(m, cfg, mode):
    config = CONFIGS[cfg]
    if config is not None and ("BLOCK_M" in config) != (m > 8):
        pytest.skip("GEMV configs for M <= 8, GEMM configs above")
    n, k, g, bits = 200, 512, 64, 4
    u = torch.randint(0, 16, (n, k), device="cuda")
    s = (torch.rand(n, k // g, device="cuda") + 0.5).half()
    lut = z = None
    if mode == "lut":
        lut = torch.randn(n, 16, device="cuda").half()
    else:
        z = (torch.rand(n, k // g, device="cuda") * 15).half()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    packed = pack_codes(u, bits)
    kw = {"bits": bits, "k": k, "mode": "lut" if lut is not None else "affine", "lut": lut}
    y = lowbit_linear(x, packed, s, z, config=config, **kw)
    ref = lowbit_linear_reference(x, packed, s, z, **kw)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=5e-2)


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


def test_named_large_tiles_gpu():
    """The 8-warp tiles dropped from autotuning for occupancy (NAMED_CONFIGS) still run
    right as explicit configs."""
    from qtrain_kernels import codebook_matmul, lowbit_matmul, w8a8

    n, k, g = 333, 1024, 128
    x = torch.randn(300, k, device="cuda", dtype=torch.float16)
    packed = pack_codes(torch.randint(0, 16, (n, k), device="cuda"), 4)
    s = (torch.rand(n, k // g, device="cuda") * 0.01).half()
    z = torch.randint(0, 16, (n, k // g), device="cuda", dtype=torch.uint8)
    ref = lowbit_linear_reference(x, packed, s, z, bits=4, k=k)
    for cfg in lowbit_matmul.NAMED_CONFIGS.values():
        torch.testing.assert_close(lowbit_linear(x, packed, s, z, bits=4, k=k, config=cfg).float(),
                                   ref.float(), rtol=2e-2, atol=5e-2)
    codes = torch.randint(0, 256, (n, k // 8), device="cuda", dtype=torch.uint8)
    cents = torch.randn(256, 8, device="cuda", dtype=torch.float16) * 0.05
    for cfg in codebook_matmul.NAMED_CONFIGS.values():
        torch.testing.assert_close(codebook_linear(x, codes, cents, config=cfg),
                                   codebook_linear_reference(x, codes, cents), rtol=2e-2,
                                   atol=2e-2)
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    sw = torch.rand(n, device="cuda") * 0.01
    for cfg in w8a8.NAMED_CONFIGS.values():
        torch.testing.assert_close(w8a8_linear(x, qw, sw, config=cfg),
                                   w8a8_linear_reference(x, qw, sw), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gemlite_as_benchmarked_matches_its_weight(bits):
    """benchmarks/bench_kernels.py's gemlite layer (when gemlite is installed): its output
    is x @ W^T for W = (codes - zeros) * scales, so the benchmark times a correct call."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gemlite, note = bench.import_gemlite()
    if gemlite is None:
        pytest.skip(note)
    layer = bench.GemliteLayer(gemlite, bits, 512, 256, "cuda", keep_codes=True)
    for m in (1, 16, 64):
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        assert bench.rel_error(layer, x) < 1e-2
