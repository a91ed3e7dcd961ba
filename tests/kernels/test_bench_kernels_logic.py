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
    # BLOCK_M 128 (8 warps) left the list for occupancy (1 block per SM, issue 17)
    assert {c["BLOCK_M"] for c in gemm_candidates_for(1024, _GEMM_CANDIDATES)} == {64}
    assert all(len(gemm_candidates_for(m, _GEMM_CANDIDATES)) <= 12 for m in (9, 64, 1024))
    only_big = [{"BLOCK_M": 128}]
    assert gemm_candidates_for(16, only_big) == only_big  # none fits: keep them all


# -- gemlite beside fp16 cuBLAS and tinygemm (issue 17, item 4) ------------------------------

def test_gemlite_methods_and_bytes_hand_worked(bench):
    assert bench.GEMLITE == {"gemlite_a16w8": 8, "gemlite_a16w4": 4, "gemlite_a16w2": 2}
    # A16W4 group 128 at K = N = 8192, M = 1: codes K*N/2 B, fp16 scale + fp16 zero per group
    # (64 groups per row), fp16 x in and y out
    want = 8192 * 8192 // 2 + 64 * 8192 * (2 + 2) + 2 * 8192 * 2
    assert bench.bytes_moved("gemlite_a16w4", 8192, 8192, 1) == want
    assert bench.bytes_moved("gemlite_a16w8", 4096, 4096, 16) == (
        4096 * 4096 + 32 * 4096 * 4 + 2 * 16 * 4096 * 2)


def test_plan_methods_drops_gemlite_when_unavailable_and_names_unknown_methods(bench):
    every = list(bench.METHODS)
    assert bench.plan_methods(every, gemlite_ok=True) == every
    without = bench.plan_methods(every, gemlite_ok=False)
    assert without == [m for m in every if not m.startswith("gemlite_")]
    assert "fp16_cublas" in without and "torch_int4_tinygemm" in without
    # METHODS order, whatever the order asked
    assert bench.plan_methods(["gemlite_a16w4", "fp16_cublas"], True) == [
        "fp16_cublas", "gemlite_a16w4"]
    with pytest.raises(ValueError, match=r"unknown \['gemlite_w4'\].*allowed.*gemlite_a16w4"):
        bench.plan_methods(["fp16_cublas", "gemlite_w4"], True)


def test_import_gemlite_without_it_gives_none_and_the_reason(bench, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gemlite", None)  # what Python does for a blocked import
    mod, note = bench.import_gemlite()
    assert mod is None
    assert note.startswith("gemlite not benchmarked: ModuleNotFoundError")


def test_import_gemlite_here(bench):
    """On a machine without CUDA gemlite is absent or fails at import (it asks torch for the
    GPU's compute capability): either way the benchmark skips it with a note, no exception."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA: gemlite may import")
    mod, note = bench.import_gemlite()
    assert mod is None and note.startswith("gemlite not benchmarked: ")


def test_gemlite_weight_hand_worked(bench):
    import torch

    codes = torch.tensor([[0, 15, 7, 8], [3, 3, 12, 1]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25]], dtype=torch.float16)
    zeros = torch.tensor([[8.0, 8.0], [2.0, 4.0]], dtype=torch.float16)
    w = bench.gemlite_weight(codes, scales, zeros, group=2)
    want = torch.tensor([[(0 - 8) * 0.5, (15 - 8) * 0.5, (7 - 8) * 2.0, (8 - 8) * 2.0],
                         [(3 - 2) * 1.0, (3 - 2) * 1.0, (12 - 4) * 0.25, (1 - 4) * 0.25]])
    assert torch.equal(w, want)


def test_table_rows_errors_and_notes(bench, tmp_path):
    rows = [{"kind": "env", "gpu": "NVIDIA H200", "gemlite": "gemlite 0.6.0.post2"},
            {"kind": "note", "gemlite": "gemlite not benchmarked: x"},
            bench.make_row("gemlite_a16w4", 8192, 8192, 1, 22.8, 38.7, 4800.0),
            bench.make_row("fp16_cublas", 8192, 8192, 1, 38.7, 38.7, 4800.0),
            bench.make_row("fp16_cublas", 4096, 4096, 16, 13.7, 13.7, None),
            {"kind": "qtrain_w8a8", "K": 8192, "N": 8192, "M": 1, "error": "RuntimeError('a|b')"}]
    rows[2]["rel_err"] = 1.5e-3
    path = tmp_path / "r.json"
    bench.write_json(rows, str(path))
    assert bench.main(["--table", str(path)]) == 0  # no GPU needed
    text = bench.table(rows)
    body = [ln for ln in text.splitlines() if ln.startswith("| 4096") or ln.startswith("| 8192")]
    # % of floor at 4.8 TB/s: fp16 (2*8192^2 + 2*2*8192) B / 4.8e6 B/us = 27.97 us of 38.7;
    # gemlite W4 (8192^2/2 + 64*8192*4 + 2*2*8192) B = 7.43 us of 22.8
    assert body == [
        "| 4096x4096 | 16 | fp16_cublas | 13.7 | 1.00 | - | - |",
        "| 8192x8192 | 1 | fp16_cublas | 38.7 | 1.00 | 72.3 | - |",
        "| 8192x8192 | 1 | qtrain_w8a8 | error: RuntimeError('a/b') | | | |",
        "| 8192x8192 | 1 | gemlite_a16w4 | 22.8 | 1.70 | 32.6 | 1.5e-03 |",
    ]
    assert "- note: gemlite=gemlite not benchmarked: x" in text
    assert "gpu=NVIDIA H200" in text


def test_gpu_session_runs_gemlite_beside_the_baselines_and_prepares_its_wheel(bench):
    import re
    import subprocess

    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")], check=True)
    goals = re.search(r"^GOALS=(\S+)\n^GOALS=\$GOALS,(\S+)$", script, re.M)
    methods = (goals.group(1) + "," + goals.group(2)).split(",")
    assert bench.plan_methods(methods, True) == [m for m in bench.METHODS if m in methods]
    assert {"fp16_cublas", "torch_int4_tinygemm", *bench.GEMLITE} <= set(methods)
    for stage in re.findall(r'^bench \d+ \S+ (\S+) \w+$', script, re.M):
        if stage != '"$GOALS"':
            bench.plan_methods(stage.split(","), True)  # every stage names real methods
    assert 'pip wheel --no-deps -q -w .whl "$GEMLITE_SPEC"' in script  # --prepare
    assert "--target /tmp/site .whl/*.whl" in script  # the device run installs it
