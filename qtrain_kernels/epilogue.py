"""``@triton.jit`` device helpers shared by the GEMV / GEMM kernels.

* :func:`tile_offsets`: rows / columns (and their bound masks) of the output tile of a 1-D
  program id laid out row-major over ``cdiv(N, BLOCK_N)`` column tiles.
* :func:`split_k_bounds`: the K range ``[k_lo, k_hi)`` of split ``pid_k`` of ``SPLIT_K``,
  a whole number of ``BLOCK_K`` blocks (the last ones may lie past K; loads mask them).
* :func:`store_split_k`: the epilogue: bias added by split 0 only, then a plain store
  (``SPLIT_K == 1``, cast to the output dtype) or an fp32 ``atomic_add`` into a zeroed
  workspace (split-K partial sums).

They are ordinary ``@triton.jit`` functions: inlined by the compiler on CUDA, and run by
Triton's interpreter when a :class:`qtrain_kernels.runtime.DualKernel` launches a kernel on
CPU tensors (the runtime routes nested ``@triton.jit`` calls to the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    grid_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def split_k_bounds(pid_k, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    return k_lo, k_lo + k_chunk


@triton.jit
def store_split_k(acc, y_ptr, offs, omask, b_ptr, rn, n_ok, pid_k,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """``y[offs] = acc (+ bias[rn])``: ``acc`` (BLOCK_N,) or (BLOCK_M, BLOCK_N), the bias row
    ``rn`` / ``n_ok`` (BLOCK_N,) broadcast over the rows."""
    if HAS_BIAS:  # noqa: SIM102 - constexpr branch, then runtime branch
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(y_ptr + offs, acc, mask=omask)
