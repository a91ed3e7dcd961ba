"""Codebook (k-means / product-quantized) linear: ``y = x @ W_hat^T (+ bias)``.

W_hat is gathered in registers from uint8 codes and a float16 codebook (layout in
:mod:`qtrain_kernels.layout`): ``W[n, j*bs + i] = centroids[codes[n, j], i]`` (Jegou et al.
2011 product quantization as used by iPQ, Stock et al. 2019, sec. 3). One kernel for M = 1
(GEMV with split-K) and one tiled ``tl.dot`` kernel for M >= 2; fp32 accumulation. The
codebook (at most 256 x bs half floats, <= 16 KiB for bs = 32) stays in L1/L2. For
power-of-two ``bs`` each code is loaded once per tile and its sub-vector gathered as one
row of ``bs`` centroid entries; other block sizes gather per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import split_k_bounds, store_split_k, tile_offsets
from .layout import dequantize_codebook
from .runtime import ACT_DTYPES, SMALL_M_GEMM_DEFAULT, as_2d, check_tensor, dual_jit, splitk_linear


@triton.jit
def _gather(c_ptr, cb_ptr, kk, nn_, Kc, wmask, BS: tl.constexpr):
    """Per element: its sub-vector's code, then the centroid entry (any block size)."""
    code = tl.load(c_ptr + nn_ * Kc + kk // BS, mask=wmask, other=0).to(tl.int32)
    return tl.load(cb_ptr + code * BS + kk % BS, mask=wmask, other=0.0).to(tl.float32)


def _cb_gemv_body(x_ptr, c_ptr, cb_ptr, b_ptr, y_ptr, M, N, K, Kc, stride_xm,
                  BS: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_lo, k_hi = split_k_bounds(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xv = tl.load(x_ptr + row * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
        if VEC:  # one code load per sub-vector, its BS centroid entries gathered as a row
            NB: tl.constexpr = BLOCK_K // BS
            rc = k0 // BS + tl.arange(0, NB)
            code = tl.load(c_ptr + rn[:, None] * Kc + rc[None, :],
                           mask=n_ok[:, None] & (rc < Kc)[None, :], other=0).to(tl.int32)
            w = tl.load(cb_ptr + code[:, :, None] * BS + tl.arange(0, BS)[None, None, :],
                        mask=n_ok[:, None, None], other=0.0).to(tl.float32)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        else:
            w = _gather(c_ptr, cb_ptr, rk[None, :], rn[:, None], Kc,
                        n_ok[:, None] & k_ok[None, :], BS)
        acc += tl.sum(w * xv[None, :], axis=1)
    store_split_k(acc, y_ptr, row * N + rn, n_ok, b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


def _cb_gemm_body(x_ptr, c_ptr, cb_ptr, b_ptr, y_ptr, M, N, K, Kc, stride_xm,
                  BS: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    rm, rn, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    k_lo, k_hi = split_k_bounds(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if VEC:
            NB: tl.constexpr = BLOCK_K // BS
            rc = k0 // BS + tl.arange(0, NB)
            code = tl.load(c_ptr + rn[None, :] * Kc + rc[:, None],
                           mask=(rc < Kc)[:, None] & n_ok[None, :], other=0).to(tl.int32)
            w = tl.load(cb_ptr + code[:, None, :] * BS + tl.arange(0, BS)[None, :, None],
                        mask=n_ok[None, None, :], other=0.0)
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        else:
            w = _gather(c_ptr, cb_ptr, rk[:, None], rn[None, :], Kc,
                        k_ok[:, None] & n_ok[None, :], BS)
        acc += tl.dot(xt, w.to(xt.dtype), input_precision="ieee")
    store_split_k(acc, y_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                  b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


def vectorized(bs: int, block_k: int) -> bool:
    """Whether a ``block_k`` block takes the per-sub-vector path (``VEC``): ``bs`` a power of
    two dividing the block; other block sizes (e.g. 9 for 3x3 kernels) gather per element."""
    return bs & (bs - 1) == 0 and block_k % bs == 0


_cb_gemv = dual_jit(_cb_gemv_body)
_cb_gemm = dual_jit(_cb_gemm_body)

_GEMV_CANDIDATES = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4}
    for bn in (16, 32, 64) for bk in (128, 256) for sk in (1, 2, 4, 8)
]
# GEMM candidates fit at least two blocks per SM on sm_80 and sm_90 (compile_check --full;
# benchmarks/kernel_occupancy.md). Dropped for occupancy (issue 17): the 8-warp 128x128x64
# tile (176-216 registers x 256 threads: 1 block/SM on sm_80), kept as NAMED_CONFIGS.
_GEMM_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
    for bm, bn in ((16, 64), (32, 128), (64, 128)) for sk in (1, 2)
]
# Explicit launch configurations outside the autotune list (``config=NAMED_CONFIGS[name]``).
NAMED_CONFIGS = {
    "gemm_128x128x64_w8": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1,
                           "num_warps": 8, "num_stages": 3},
}


def codebook_linear(
    x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
    bias: torch.Tensor | None = None, *, config: dict | None = None,
) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with ``codes`` (N, K/bs) uint8, ``centroids`` (<=256, bs)."""
    check_tensor(x, "x", ACT_DTYPES, x.device, contiguous=False)
    dev = x.device
    check_tensor(codes, "codes", (torch.uint8,), dev)
    check_tensor(centroids, "centroids", (torch.float16, torch.float32, torch.bfloat16), dev)
    if codes.dim() != 2 or centroids.dim() != 2:
        raise ValueError("codes must be (N, K/bs) and centroids (n_centroids, bs)")
    n, kc = codes.shape
    bs = centroids.shape[1]
    k = kc * bs
    x2 = as_2d(x, k)
    return splitk_linear(
        x, x2, (codes, centroids), (kc,), n, k, bias, gemv=_cb_gemv, gemm=_cb_gemm,
        flags={"BS": bs}, name="codebook", key_extra=f"bs{bs}",
        per_config=lambda cfg: {"VEC": vectorized(bs, cfg["BLOCK_K"])},
        candidates=(_GEMV_CANDIDATES, _GEMM_CANDIDATES),
        gemm_default=(dict(SMALL_M_GEMM_DEFAULT, BLOCK_K=64) if x2.shape[0] <= 16 else
                      {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1,
                       "num_warps": 4, "num_stages": 3}),
        config=config)


def codebook_linear_reference(x, codes, centroids, bias=None) -> torch.Tensor:
    w = dequantize_codebook(codes, centroids, dtype=x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
