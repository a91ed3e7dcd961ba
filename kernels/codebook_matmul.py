"""Codebook (k-means / product-quantized) linear: ``y = x @ W_hat^T (+ bias)``.

W_hat is gathered in registers from uint8 codes and a float16 codebook (layout in
:mod:`qtrain_kernels.layout`): ``W[n, j*bs + i] = centroids[codes[n, j], i]`` (Jegou et al.
2011 product quantization as used by iPQ, Stock et al. 2019, sec. 3). One kernel for small M
(GEMV with split-K) and one tiled ``tl.dot`` kernel for large M; fp32 accumulation. The
codebook (at most 256 x bs half floats, <= 16 KiB for bs = 32) stays in L1/L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import dequantize_codebook
from .runtime import (
    ACT_DTYPES,
    as_2d,
    check_tensor,
    choose_config,
    dual_jit,
    interpreting,
    m_bucket,
)

GEMV_MAX_M = 8


@triton.jit
def _gather(c_ptr, cb_ptr, kk, nn_, Kc, wmask, BS: tl.constexpr):
    code = tl.load(c_ptr + nn_ * Kc + kk // BS, mask=wmask, other=0).to(tl.int32)
    return tl.load(cb_ptr + code * BS + kk % BS, mask=wmask, other=0.0).to(tl.float32)


def _cb_gemv_body(x_ptr, c_ptr, cb_ptr, b_ptr, y_ptr, M, N, K, Kc, stride_xm,
                  BS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xv = tl.load(x_ptr + row * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
        w = _gather(c_ptr, cb_ptr, rk[None, :], rn[:, None], Kc, n_ok[:, None] & k_ok[None, :], BS)
        acc += tl.sum(w * xv[None, :], axis=1)
    if HAS_BIAS:  # noqa: SIM102 - constexpr branch, then runtime branch
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + row * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(y_ptr + row * N + rn, acc, mask=n_ok)


def _cb_gemm_body(x_ptr, c_ptr, cb_ptr, b_ptr, y_ptr, M, N, K, Kc, stride_xm,
                  BS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _gather(c_ptr, cb_ptr, rk[:, None], rn[None, :], Kc, k_ok[:, None] & n_ok[None, :], BS)
        acc += tl.dot(xt, w.to(xt.dtype), input_precision="ieee")
    if HAS_BIAS:  # noqa: SIM102 - constexpr branch, then runtime branch
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(y_ptr + offs, acc, mask=omask)


_cb_gemv = dual_jit(_cb_gemv_body)
_cb_gemm = dual_jit(_cb_gemm_body)

_GEMV_CANDIDATES = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4}
    for bn in (16, 32, 64) for bk in (128, 256) for sk in (1, 2, 4, 8)
]
_GEMM_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": sk, "num_warps": w, "num_stages": 3}
    for bm, bn, w in ((16, 64, 4), (32, 128, 4), (64, 128, 4), (128, 128, 8)) for sk in (1, 2)
]


def codebook_linear(
    x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
    bias: torch.Tensor | None = None, *, config: dict | None = None,
) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` with ``codes`` (N, K/bs) uint8, ``centroids`` (<=256, bs)."""
    check_tensor(x, "x", ACT_DTYPES, x.device)
    dev = x.device
    check_tensor(codes, "codes", (torch.uint8,), dev)
    check_tensor(centroids, "centroids", (torch.float16, torch.float32, torch.bfloat16), dev)
    if codes.dim() != 2 or centroids.dim() != 2:
        raise ValueError("codes must be (N, K/bs) and centroids (n_centroids, bs)")
    n, kc = codes.shape
    bs = centroids.shape[1]
    k = kc * bs
    x2 = as_2d(x, k)
    if bias is not None:
        check_tensor(bias, "bias", ACT_DTYPES, dev, (n,))
    m = x2.shape[0]
    interp = interpreting(dev)
    xin = x2.float() if (interp and x2.dtype == torch.bfloat16) else x2
    small = m <= GEMV_MAX_M

    def launch(cfg: dict) -> torch.Tensor:
        split = cfg["SPLIT_K"]
        y = (torch.zeros if split > 1 else torch.empty)(
            m, n, device=dev, dtype=torch.float32 if split > 1 else xin.dtype)
        args = (xin, codes, centroids, bias if bias is not None else centroids, y, m, n, k, kc,
                xin.stride(0))
        if small:
            _cb_gemv[dev][(triton.cdiv(n, cfg["BLOCK_N"]), m, split)](
                *args, BS=bs, HAS_BIAS=bias is not None, **cfg)
        else:
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
            _cb_gemm[dev][grid](*args, BS=bs, HAS_BIAS=bias is not None, **cfg)
        return y

    if config is None:
        if small:
            default = ({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1} if interp else
                       {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4})
        else:
            default = ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1} if interp else
                       {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1,
                        "num_warps": 4, "num_stages": 3})
        key = f"codebook|{'gemv' if small else 'gemm'}|M{m_bucket(m)}|N{n}|K{k}|bs{bs}|{x.dtype}"
        config = choose_config(key, dev, _GEMV_CANDIDATES if small else _GEMM_CANDIDATES,
                               default, launch)
    return launch(config).to(x.dtype).reshape(*x.shape[:-1], n)


def codebook_linear_reference(x, codes, centroids, bias=None) -> torch.Tensor:
    w = dequantize_codebook(codes, centroids, dtype=x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
