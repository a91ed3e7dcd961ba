"""The kernels compile for real GPUs (sm_80, sm_90) without spills, checked on the CPU.

Triton compiles ahead of time for a named target with its bundled ptxas, so a kernel the
interpreter accepts but a GPU compiler rejects, or one that spills registers to local memory,
fails here without a GPU (``qtrain_kernels.compile_check``). The default run compiles every
entry point with its GPU default configuration over a representative set of formats; the
sweep over every autotune candidate is ``-m slow``.
"""

import os

import pytest
import torch
import triton
import triton.language as tl
from qtrain_kernels import compile_check as cc
from qtrain_kernels import lowbit_matmul
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


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    reports = cc.check(cc.default_launches(), (80, 90), workers=os.cpu_count() or 1)
    assert len(reports) == 2 * len(cc.default_launches())
    assert all(r.registers > 0 for r in reports if r.error is None)
    assert not _fail_lines(reports), _fail_lines(reports)


def _twice(v):  # a helper that lost its @triton.jit: plain Python
    return v * 2.0


def _scale_rows_body(x_ptr, y_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    idx = r[:, None] * B + r[None, :]
    tl.store(y_ptr + idx, _twice(tl.load(x_ptr + idx)))


_scale_rows = dual_jit(_scale_rows_body)


def test_a_kernel_the_interpreter_runs_but_no_gpu_compiles_fails_the_check():
    """A device helper without ``@triton.jit`` is an ordinary Python call to the interpreter
    (right answer) and an unsupported function to the GPU compiler: only the check sees it."""
    x = torch.randn(16, 16)
    y = torch.empty(16, 16)
    _scale_rows[x.device][(1,)](x, y, B=16)
    torch.testing.assert_close(y, 2 * x)  # the interpreter's answer is right
    with cc.record_gpu_launches("broken") as rec:
        _scale_rows[x.device][(1,)](x, y, B=16)
    assert len(rec) == 1
    (broken,) = cc.check(rec, (90,))
    assert broken.error is not None and "_twice" in broken.error, broken.line()
    assert not cc.ok(broken)


@pytest.mark.slow
def test_a_spilling_configuration_fails_the_check():
    """The GEMV at BLOCK_K = 512 with int4 group-128 zero-points (a former autotune
    candidate) spills kilobytes per thread: the check must say so."""
    case = {"int4-g128": cc.LOWBIT_CASES["int4-g128-u8zp-bias"]}
    (la,) = cc.lowbit_launches((1,), case, {"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 1,
                                            "num_warps": 4})
    (report,) = cc.check([la], (80,))
    assert report.error is None and report.local_bytes > 1000, report.line()
    assert not cc.ok(report)


@pytest.mark.slow
def test_every_autotune_candidate_compiles_without_spills():
    reports = cc.check(cc.candidate_launches(), (80, 90), workers=os.cpu_count() or 1)
    assert not _fail_lines(reports), _fail_lines(reports)


def test_gemv_candidates_keep_block_k_within_the_unspilled_range():
    assert all(c["BLOCK_K"] <= 256 for c in lowbit_matmul._GEMV_CANDIDATES)
