"""The kernels compile for real GPUs (sm_80, sm_90) without spills, checked on the CPU.

Triton compiles ahead of time for a named target with its bundled ptxas, so a kernel the
interpreter accepts but a GPU compiler rejects, or one that spills registers to local memory,
fails here without a GPU (``qtrain_kernels.compile_check``). The default run compiles every
entry point with its GPU default configuration over a representative set of formats; the
sweep over every autotune candidate is ``-m slow``. Occupancy (issue 17): defaults and
autotune candidates fit at least two blocks per SM on both targets; the committed table
benchmarks/kernel_occupancy.md (written by ``compile_check --full --table``) must list exactly
the current candidate lists.
"""

import os
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from qtrain_kernels import codebook_matmul, lowbit_matmul, w8a8
from qtrain_kernels import compile_check as cc
from qtrain_kernels.runtime import dual_jit

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                    "bin", "ptxas")),
    reason="triton's bundled ptxas is not installed")


def _fail_lines(reports):
    return "\n".join(r.line() for r in reports if not cc.ok(r))


def test_default_launch_set_covers_every_entry_point_and_flag():
    launches = cc.default_launches()
    names = {la.fn.__name__ for la in launches}
    assert names == {"_gemv_body", "_gemm_body", "_cb_gemv_body", "_cb_gemm_body",
                     "_quant_rows_body", "_w8a8_body", "_bitserial_body"}
    lowbit = [la.kwargs for la in launches if la.fn.__name__ in ("_gemv_body", "_gemm_body")]
    assert {kw["MODE"] for kw in lowbit} == {0, 1, 2}
    assert {kw["BITS"] for kw in lowbit} >= {1, 2, 4, 8}
    assert {kw["PER_CHANNEL"] for kw in lowbit} == {True, False}
    assert {kw["HAS_Z"] for kw in lowbit} == {True, False}
    assert {kw["HAS_BIAS"] for kw in lowbit} == {True, False}
    assert {kw["SPLIT_K"] for kw in lowbit} == {1, 4}  # GEMV and small-M GEMM split K
    x_dtypes = {la.args[0].dtype for la in launches if la.fn.__name__ == "_gemm_body"}
    assert x_dtypes == {torch.float16, torch.bfloat16, torch.float32}
    # the GPU branch was taken: GPU defaults, not the interpreter's 16 x 16 x 32 tiles
    assert all(kw["BLOCK_K"] >= 16 and "num_warps" in kw for kw in lowbit)


def _twice(v):  # a helper that lost its @triton.jit: plain Python
    return v * 2.0


def _scale_rows_body(x_ptr, y_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    idx = r[:, None] * B + r[None, :]
    tl.store(y_ptr + idx, _twice(tl.load(x_ptr + idx)))


_scale_rows = dual_jit(_scale_rows_body)
ADDED = codebook_matmul.NAMED_CONFIGS["gemm_128x128x64_w8"]


@pytest.fixture(scope="module")
def compiled():
    """One pool of compiling processes (their start-up, importing torch and triton, is most
    of the wall time here) for three checks: every entry point's GPU default launch; the
    codebook GEMM candidate list with a deliberately added 1-block tile (the dropped 8-warp
    128x128x64: 176 registers x 256 threads on sm_80); a deliberately broken kernel."""
    saved = codebook_matmul._GEMM_CANDIDATES
    codebook_matmul._GEMM_CANDIDATES = [ADDED]  # what a careless edit of the list would do
    try:
        added = cc.candidate_launches(("codebook_gemm",))
    finally:
        codebook_matmul._GEMM_CANDIDATES = saved
    with cc.record_gpu_launches("broken") as broken:
        _scale_rows[torch.device("cpu")][(1,)](torch.zeros(16, 16), torch.zeros(16, 16), B=16)
    groups = {"defaults": cc.default_launches(), "added": added, "broken": broken}
    targets = {"defaults": (80, 90), "added": (80, 90), "broken": (90,)}
    jobs = [(la, t) for g, las in groups.items() for la in las for t in targets[g]]
    reports = cc.check_jobs(jobs, workers=os.cpu_count() or 1)
    out, i = {}, 0
    for g, las in groups.items():
        n = len(las) * len(targets[g])
        out[g], i = reports[i:i + n], i + n
    return out


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    reports = compiled["defaults"]
    assert len(reports) == 2 * len(cc.default_launches())
    assert all(r.registers > 0 for r in reports if r.error is None)
    assert not _fail_lines(reports), _fail_lines(reports)
    low = cc.occupancy_problems(reports)  # the GPU defaults fit >= 2 blocks per SM
    assert not low, "\n".join(low)


def test_an_added_one_block_candidate_is_reported(compiled):
    """The occupancy check fails on a 1-block autotune candidate: the one added to the
    codebook GEMM list in ``compiled`` compiles cleanly but is reported on sm_80."""
    reports = compiled["added"]
    assert [(r.launch.kwargs["BLOCK_M"], r.target) for r in reports] == [(128, 80), (128, 90)]
    assert not _fail_lines(reports), _fail_lines(reports)  # compiles, no spills ...
    (low,) = cc.occupancy_problems(reports)  # ... but fits one block per SM on sm_80
    assert low.startswith("sm_80 _cb_gemm_body") and "1 block(s)/SM < 2" in low, low
    assert reports[1].blocks_per_sm == 2  # sm_90: 119 registers, 65536 B shared


def test_a_kernel_the_interpreter_runs_but_no_gpu_compiles_fails_the_check(compiled):
    """A device helper without ``@triton.jit`` is an ordinary Python call to the interpreter
    (right answer) and an unsupported function to the GPU compiler: only the check sees it."""
    x = torch.randn(16, 16)
    y = torch.empty(16, 16)
    _scale_rows[x.device][(1,)](x, y, B=16)
    torch.testing.assert_close(y, 2 * x)  # the interpreter's answer is right
    (broken,) = compiled["broken"]
    assert broken.launch.fn is _scale_rows_body
    assert broken.error is not None and "_twice" in broken.error, broken.line()
    assert not cc.ok(broken)


def test_blocks_per_sm_hand_worked():
    def rep(regs, warps, shared, target=80):
        la = cc.Launch(_scale_rows_body, (), {})
        return cc.CompileReport(la, target, 0.0, regs, 0, shared, num_warps=warps)

    # 255 regs -> 8160 per warp, allocated as 8192; x 8 warps = all 65536: one block
    assert rep(255, 8, 57344).blocks_per_sm == 1
    # 168 regs x 32 = 5376 (21 units of 256) x 4 warps = 21504 -> 3 by registers; shared
    # 167936 // (57344 + 1024 reserved) = 2 on sm_80, 233472 // 58368 = 4 on sm_90
    assert rep(168, 4, 57344).blocks_per_sm == 2
    assert rep(168, 4, 57344, 90).blocks_per_sm == 3
    # 82 KiB: two fit without the driver's 1 KiB per block, one with it (164 KiB SM)
    assert rep(32, 4, 82 * 1024).blocks_per_sm == 1
    assert rep(16, 1, 0).blocks_per_sm == 32  # the 32-block cap, not 2048 / 32 threads
    assert rep(40, 4, 1024).blocks_per_sm == 12  # 40*32 = 1280 -> x4 = 5120 -> 12 (regs)


TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_occupancy.md"


def _table_sections():
    text = TABLE.read_text()
    parts = text.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: cc.parse_markdown_table(p) for p in parts}


def _keys(launches):
    return {(la.fn.__name__, la.label, cc.config_text(la.kwargs)) for la in launches}


def test_occupancy_table_lists_the_current_candidates_each_fitting_two_blocks():
    """The committed table (compile_check --full --table) is the compile check's output for
    exactly today's defaults, autotune lists and named configs; every default and candidate
    row: no spill, >= 2 blocks per SM on sm_80 and sm_90. (The numbers themselves are
    re-derived by the slow sweep below; this catches a list edited without the table.)"""
    sections = _table_sections()
    want = {cc.SECTIONS["defaults"]: cc.default_launches(),
            cc.SECTIONS["candidates"]: cc.candidate_launches(),
            cc.SECTIONS["named"]: cc.named_launches()}
    assert set(sections) == set(want)
    for title, launches in want.items():
        rows = sections[title]
        got = {(r["kernel"], r["format"], r["config"]) for r in rows}
        assert got == _keys(launches), (title, got ^ _keys(launches))
        if title == cc.SECTIONS["named"]:
            assert all(int(r["sm_80 blocks/SM"]) == 1 for r in rows)  # why they were dropped
            continue
        for r in rows:
            for t in (80, 90):
                assert r[f"sm_{t} spill B"] == "0", r
                assert int(r[f"sm_{t} blocks/SM"]) >= cc.MIN_BLOCKS_PER_SM, r
    named = [c for m in (lowbit_matmul, codebook_matmul, w8a8) for c in m.NAMED_CONFIGS.values()]
    lists = [c for cands in cc.candidate_lists().values() for c in cands]
    assert not [c for c in named if c in lists]


@pytest.mark.slow
def test_a_spilling_configuration_fails_the_check():
    """The GEMV at BLOCK_N = 64, BLOCK_K = 512 with int4 group-128 zero-points (a former
    autotune candidate) spills kilobytes per thread (3080 B on sm_80 with triton 3.8; the
    BLOCK_N = 32 one no longer spills: 206 registers): the check must say so."""
    case = {"int4-g128": cc.LOWBIT_CASES["int4-g128-u8zp-bias"]}
    (la,) = cc.lowbit_launches((1,), case, {"BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 1,
                                            "num_warps": 4})
    (report,) = cc.check([la], (80,))
    assert report.error is None and report.local_bytes > 1000, report.line()
    assert not cc.ok(report)


@pytest.mark.slow
def test_every_autotune_candidate_compiles_without_spills_and_fits_two_blocks_per_sm():
    reports = cc.check(cc.candidate_launches(), (80, 90), workers=os.cpu_count() or 1)
    assert not _fail_lines(reports), _fail_lines(reports)
    low = cc.occupancy_problems(reports)
    assert not low, "\n".join(low)


def test_gemv_candidates_keep_block_k_within_the_unspilled_range():
    assert all(c["BLOCK_K"] <= 256 for c in lowbit_matmul._GEMV_CANDIDATES)
