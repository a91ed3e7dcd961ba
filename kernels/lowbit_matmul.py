"""Weight-only low-bit linear: ``y = x @ W_hat^T (+ bias)``, W_hat dequantized in registers.

Covers int8 / int4 / int2 (and 1-bit, 3-bit in 4-bit containers, ...) uniform weights,
symmetric or asymmetric, per channel or per group, plus ternary and binary weights (layouts:
:mod:`qtrain_kernels.layout`). Activations fp16 / bf16 / fp32; products accumulate in fp32.

Two Triton kernels:

* ``_gemv_kernel`` (M <= 8): one program per (row, block of N outputs, K split); no tensor
  cores, a broadcast multiply and a row reduction. Split-K (partial sums combined with fp32
  atomics) keeps all SMs busy when N / BLOCK_N is small.
* ``_gemm_kernel`` (larger M): tiled ``tl.dot`` GEMM, weight tile unpacked to the activation
  dtype; split-K likewise.

Dequantization follows Jacob et al. 2018 eq. (1), ``W = (u - z) * s`` (binary:
``(2u - 1) * s``), in fp32, then rounded to the activation dtype for the product. Both kernels
are capturable in CUDA graphs (the only allocation is the output / split-K workspace, made by
torch on the current stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import split_k_bounds, store_split_k, tile_offsets
from .layout import check_groups, container_bits, dequantize_uniform
from .runtime import ACT_DTYPES, as_2d, check_tensor, dual_jit, splitk_linear

MODES = {"affine": 0, "binary": 1}


@triton.jit
def _dequant(word, kk, nn_, s_ptr, z_ptr, n_groups, wmask,
             BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
             HAS_Z: tl.constexpr, ZERO: tl.constexpr):
    E: tl.constexpr = 32 // BITS
    u = ((word >> ((kk % E) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    goff = nn_ * n_groups + kk // GROUP
    s = tl.load(s_ptr + goff, mask=wmask, other=0.0).to(tl.float32)
    if MODE == 1:
        w = (2.0 * u - 1.0) * s
    else:
        if HAS_Z:
            z = tl.load(z_ptr + goff, mask=wmask, other=0).to(tl.float32)
        else:
            z = ZERO
        w = (u - z) * s
    return w


def _gemv_body(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, Kw, n_groups, stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
               HAS_Z: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    E: tl.constexpr = 32 // BITS
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
        wmask = n_ok[:, None] & k_ok[None, :]
        word = tl.load(w_ptr + rn[:, None] * Kw + (rk // E)[None, :], mask=wmask, other=0)
        w = _dequant(word, rk[None, :], rn[:, None], s_ptr, z_ptr, n_groups, wmask,
                     BITS, GROUP, MODE, HAS_Z, ZERO)
        acc += tl.sum(w * xv[None, :], axis=1)
    store_split_k(acc, y_ptr, row * N + rn, n_ok, b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


def _gemm_body(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, Kw, n_groups, stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
               HAS_Z: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT_K: tl.constexpr):
    E: tl.constexpr = 32 // BITS
    rm, rn, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    k_lo, k_hi = split_k_bounds(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & n_ok[None, :]
        word = tl.load(w_ptr + rn[None, :] * Kw + (rk // E)[:, None], mask=wmask, other=0)
        w = _dequant(word, rk[:, None], rn[None, :], s_ptr, z_ptr, n_groups, wmask,
                     BITS, GROUP, MODE, HAS_Z, ZERO)
        acc += tl.dot(xt, w.to(xt.dtype), input_precision="ieee")
    store_split_k(acc, y_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                  b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


_gemv_kernel = dual_jit(_gemv_body)
_gemm_kernel = dual_jit(_gemm_body)

_GEMV_CANDIDATES = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w}
    for bn in (16, 32, 64) for bk in (128, 256, 512) for sk in (1, 2, 4, 8) for w in (4, 8)
]
_GEMM_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 3),
    )
    for sk in (1, 2, 4)
]


def lowbit_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    k: int,
    mode: str = "affine",
    zero: float = 0.0,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through packed uniform / ternary / binary weights.

    ``packed`` (N, ceil(K/E)) int32, ``scales`` (N, K/G), ``zeros`` (N, K/G) uint8 or None
    (then ``zero`` is the implied zero-point), ``mode`` 'affine' or 'binary'. ``config``
    overrides the launch configuration (tests); otherwise it is autotuned per GPU.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
    c = container_bits(bits)
    check_tensor(x, "x", ACT_DTYPES, x.device)
    dev = x.device
    x2 = as_2d(x, k)
    n = packed.shape[0] if packed.dim() == 2 else -1
    check_tensor(packed, "packed", (torch.int32,), dev, (None, -(-k // (32 // c))))
    check_tensor(scales, "scales", (torch.float16, torch.float32, torch.bfloat16), dev, (n, None))
    n_groups = scales.shape[1]
    if n_groups < 1 or k % n_groups:
        raise ValueError(f"scales has {n_groups} groups per row; it must divide K={k}")
    g = check_groups(k, k // n_groups)
    if zeros is not None:
        check_tensor(zeros, "zeros", (torch.uint8,), dev, tuple(scales.shape))
    m = x2.shape[0]
    return splitk_linear(
        x, x2, (packed, scales, zeros if zeros is not None else scales),
        (packed.shape[1], scales.shape[1]), n, k, bias, gemv=_gemv_kernel, gemm=_gemm_kernel,
        flags={"BITS": c, "GROUP": g, "MODE": MODES[mode], "HAS_Z": zeros is not None,
               "ZERO": float(zero)},
        name="lowbit", key_extra=f"b{c}|g{g}",
        candidates=(_GEMV_CANDIDATES, _GEMM_CANDIDATES),
        gemm_default={"BLOCK_M": 64 if m <= 64 else 128, "BLOCK_N": 128, "BLOCK_K": 64,
                      "SPLIT_K": 1, "num_warps": 8 if m > 64 else 4, "num_stages": 3},
        config=config)


def lowbit_linear_reference(x, packed, scales, zeros=None, bias=None, *, bits, k,
                            mode="affine", zero=0.0) -> torch.Tensor:
    """Pure torch: dequantize (fp32) -> round to x.dtype -> fp32 matmul -> x.dtype."""
    w = dequantize_uniform(packed, scales, zeros, bits, k, mode, zero, dtype=x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
