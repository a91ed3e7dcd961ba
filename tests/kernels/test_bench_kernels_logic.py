"""CPU-side logic of benchmarks/bench_kernels.py (the timings themselves need a GPU)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_matches_issue(bench):
    assert bench.SHAPES == [(4096, 4096), (8192, 8192), (4096, 14336)]
    assert bench.MS == [1, 2, 4, 8, 16, 64, 1024]
    assert bench.COPIES >= 8
    assert {"fp16_cublas", "torch_int4_tinygemm", "qtrain_int4_g128", "qtrain_w8a8"} <= set(
        bench.METHODS)


def test_memory_floor_hand_worked(bench):
    # int4 g128 at K=N=8192, M=1: codes 8192*8192/2 B + scales (64 groups * 8192 * 2 B)
    # + zeros (64 * 8192 * 1 B) + x 16384 B + y 16384 B
    want = 8192 * 8192 // 2 + 64 * 8192 * 3 + 2 * 8192 * 2
    assert bench.bytes_moved("qtrain_int4_g128", 8192, 8192, 1) == want
    # at the H200's 4.8 TB/s: the issue's anchor table quotes an int4 floor of ~8.4 us
    assert bench.floor_us("qtrain_int4_g128", 8192, 8192, 1, 4800.0) == pytest.approx(
        want / 4.8e6, rel=1e-12)
    assert 7.0 < bench.floor_us("qtrain_int4_g128", 8192, 8192, 1, 4800.0) < 8.6
    assert bench.bytes_moved("fp16_cublas", 4096, 4096, 16) == 4096 * 4096 * 2 + 2 * 16 * 4096 * 2
    assert bench.peak_bandwidth_gbs("NVIDIA H200") == 4800.0
    assert bench.peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_bandwidth_gbs("Some CPU") is None


def test_rows_and_json(bench, tmp_path):
    row = bench.make_row("qtrain_int4_g128", 8192, 8192, 1, 10.0, 38.7, 4800.0)
    assert row["speedup_vs_fp16"] == pytest.approx(3.87)
    assert row["pct_of_floor"] == pytest.approx(100 * row["floor_us"] / 10.0, abs=0.05)
    out = tmp_path / "sub" / "b.json"
    bench.write_json([row], str(out))
    assert json.loads(out.read_text()) == [row]


def test_main_refuses_without_cuda(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert bench.main(["--out", str(tmp_path / "x.json")]) == 2


def test_rel_error_catches_a_wrong_kernel(bench):
    import torch
    from torch import nn

    from qtrain.nn.packed import PackedLinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=False)
    packed = PackedLinear.from_linear(lin, 4, 32, False, backend="torch")
    x = torch.randn(3, 64)
    assert bench.rel_error(packed, x) < 1e-5
    assert bench.rel_error(lambda t: t @ lin.weight.t(), x) is None  # baselines: no reference

    class Wrong(nn.Module):  # a "kernel" with the scale missing
        def dequantize(self):
            return packed.dequantize()

        def forward(self, t):
            return packed(t) * 0.5

    assert bench.rel_error(Wrong(), x) > 0.4


def test_gemm_candidates_follow_m():
    from qtrain_kernels.lowbit_matmul import _GEMM_CANDIDATES
    from qtrain_kernels.runtime import gemm_candidates_for

    assert {c["BLOCK_M"] for c in gemm_candidates_for(16, _GEMM_CANDIDATES)} == {16}
    assert {c["BLOCK_M"] for c in gemm_candidates_for(64, _GEMM_CANDIDATES)} == {32, 64}
    assert {c["BLOCK_M"] for c in gemm_candidates_for(1024, _GEMM_CANDIDATES)} == {64, 128}
    assert all(len(gemm_candidates_for(m, _GEMM_CANDIDATES)) <= 12 for m in (9, 64, 1024))
    only_big = [{"BLOCK_M": 128}]
    assert gemm_candidates_for(16, only_big) == only_big  # none fits: keep them all
