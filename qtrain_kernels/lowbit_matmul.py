"""Weight-only low-bit linear: ``y = x @ W_hat^T (+ bias)``, W_hat dequantized in registers.

Covers int8 / int4 / int2 (and 1-bit, 3-bit in 4-bit containers, ...) uniform weights,
symmetric or asymmetric (integer or float zero-points), per channel or per group, ternary and
binary weights, and lookup-table weights (``mode='lut'``: non-uniform scalar codes such as
TTQ's or learned quantization points) (layouts: :mod:`qtrain_kernels.layout`). Activations
fp16 / bf16 / fp32; products accumulate in fp32.

Two Triton kernels:

* ``_gemv_kernel`` (M = 1): one program per (row, block of N outputs, K split); no tensor
  cores, a broadcast multiply and a row reduction. Split-K (partial sums combined with fp32
  atomics) keeps all SMs busy when N / BLOCK_N is small.
* ``_gemm_kernel`` (M >= 2; 16-row tiles up to M = 16 read each weight once for all rows):
  tiled ``tl.dot`` GEMM, weight tile unpacked to the activation
  dtype; split-K likewise.

Memory traffic: each int32 word of codes is loaded once per tile and split into its
``32 / bits`` codes in registers (shift + mask, reshaped so code j of word w is column
``w * E + j``); scales and zero-points are loaded once per row and group, never per element.
When a K block lies inside one group (``group_span``), the GEMM multiplies the scale into the
``BLOCK_M x BLOCK_N`` product instead of the ``BLOCK_K x BLOCK_N`` weight tile (integer
``u - z`` is exact in fp16 for codes of up to 8 bits with integer or half-integer zero-points).

Dequantization follows Jacob et al. 2018 eq. (1), ``W = (u - z) * s`` (binary:
``(2u - 1) * s``; lookup: ``lut[u] * s``), in fp32, then rounded to the activation dtype for
the tensor-core product. Both kernels are capturable in CUDA graphs (the only allocation is
the output / split-K workspace, made by torch on the current stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import split_k_bounds, store_split_k, tile_offsets
from .layout import check_groups, check_lut, container_bits, dequantize_uniform
from .runtime import ACT_DTYPES, SMALL_M_GEMM_DEFAULT, as_2d, check_tensor, dual_jit, splitk_linear

MODES = {"affine": 0, "binary": 1, "lut": 2}
ZERO_DTYPES = (torch.uint8, torch.float16, torch.float32)


def group_span(block_k: int, group: int, per_channel: bool) -> int:
    """K elements of a ``block_k`` block that share one scale (the kernels' ``GROUP_SPAN``):
    the whole block when it lies in one group (one scale per row and block, applied after
    the product), a group when groups tile the block, else a single element."""
    if per_channel or group % block_k == 0:
        return block_k
    return group if block_k % group == 0 else 1


@triton.jit
def _code_values(u, z, lut_ptr, lut_off, lmask, MODE: tl.constexpr, HAS_Z: tl.constexpr,
                 ZERO: tl.constexpr):
    """Unscaled weight values of codes ``u``: ``u - z`` (affine: ``z`` the loaded zero-points,
    broadcast to ``u``, or the constant ``ZERO``), ``2u - 1`` (binary) or ``lut[u]``."""
    if MODE == 1:
        v = 2.0 * u.to(tl.float32) - 1.0
    elif MODE == 2:
        v = tl.load(lut_ptr + lut_off + u, mask=lmask, other=0.0).to(tl.float32)
    elif HAS_Z:
        v = u.to(tl.float32) - z
    else:
        v = u.to(tl.float32) - ZERO
    return v


def _gemv_body(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr, M, N, K, Kw, n_groups,
               stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
               MODE: tl.constexpr, HAS_Z: tl.constexpr, ZERO: tl.constexpr,
               LUT_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SPAN: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    E: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // E  # packed words per row and K block
    GB: tl.constexpr = GROUP_SPAN  # K elements sharing one scale (group_span)
    NGB: tl.constexpr = BLOCK_K // GB
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    shifts = tl.arange(0, E) * BITS
    lut_off = 0
    if LUT_PER_ROW:
        lut_off = (rn * (1 << BITS))[:, None, None]
    k_lo, k_hi = split_k_bounds(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        rw = k0 // E + tl.arange(0, BKW)
        word = tl.load(w_ptr + rn[:, None] * Kw + rw[None, :],
                       mask=n_ok[:, None] & (rw < Kw)[None, :], other=0)
        # each word loaded once, its E codes split in registers: (BN, BKW, E) -> k = w*E + j
        u = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1),
                       (BLOCK_N, NGB, GB))
        if PER_CHANNEL:
            grp = tl.zeros((NGB,), dtype=tl.int32)
        else:
            grp = (k0 + tl.arange(0, NGB) * GB) // GROUP
        gmask = n_ok[:, None] & (grp < n_groups)[None, :]
        goff = rn[:, None] * n_groups + grp[None, :]
        s = tl.load(s_ptr + goff, mask=gmask, other=0.0).to(tl.float32)
        z = 0.0
        if HAS_Z:
            z = tl.load(z_ptr + goff, mask=gmask, other=0).to(tl.float32)[:, :, None]
        v = _code_values(u, z, lut_ptr, lut_off, n_ok[:, None, None], MODE, HAS_Z, ZERO)
        part = tl.sum(v * tl.reshape(xv, (NGB, GB))[None, :, :], axis=2)  # (BN, NGB)
        acc += tl.sum(part * s, axis=1)
    store_split_k(acc, y_ptr, row * N + rn, n_ok, b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


def _gemm_body(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr, M, N, K, Kw, n_groups,
               stride_xm,
               BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
               MODE: tl.constexpr, HAS_Z: tl.constexpr, ZERO: tl.constexpr,
               LUT_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SPAN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT_K: tl.constexpr):
    E: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // E
    GB: tl.constexpr = GROUP_SPAN
    NGB: tl.constexpr = BLOCK_K // GB
    rm, rn, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    shifts = tl.arange(0, E) * BITS
    lut_off = 0
    if LUT_PER_ROW:
        lut_off = (rn * (1 << BITS))[None, None, :]
    k_lo, k_hi = split_k_bounds(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                     mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        rw = k0 // E + tl.arange(0, BKW)
        word = tl.load(w_ptr + rn[None, :] * Kw + rw[:, None],
                       mask=(rw < Kw)[:, None] & n_ok[None, :], other=0)
        u = tl.reshape((word[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1),
                       (NGB, GB, BLOCK_N))
        if PER_CHANNEL:
            grp = tl.zeros((NGB,), dtype=tl.int32)
        else:
            grp = (k0 + tl.arange(0, NGB) * GB) // GROUP
        gmask = (grp < n_groups)[:, None] & n_ok[None, :]
        goff = rn[None, :] * n_groups + grp[:, None]  # (NGB, BN)
        s = tl.load(s_ptr + goff, mask=gmask, other=0.0).to(tl.float32)
        z = 0.0
        if HAS_Z:
            z = tl.load(z_ptr + goff, mask=gmask, other=0).to(tl.float32)[:, None, :]
        v = _code_values(u, z, lut_ptr, lut_off, n_ok[None, None, :], MODE, HAS_Z, ZERO)
        if NGB == 1:
            # scale after the product: (u - z) is exact in fp16 for 8-bit codes, and the
            # BLOCK_K x BLOCK_N tile needs no multiply
            w = tl.reshape(v, (BLOCK_K, BLOCK_N)).to(xt.dtype)
            acc += tl.dot(xt, w, input_precision="ieee") * s
        else:
            w = tl.reshape(v * s[:, None, :], (BLOCK_K, BLOCK_N)).to(xt.dtype)
            acc += tl.dot(xt, w, input_precision="ieee")
    store_split_k(acc, y_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                  b_ptr, rn, n_ok, pid_k, HAS_BIAS, SPLIT_K)


_gemv_kernel = dual_jit(_gemv_body)
_gemm_kernel = dual_jit(_gemm_body)

# Autotuning candidates (each is compiled once per GPU and format, then timed): kept short so
# a first run on a fresh GPU tunes in seconds, not minutes. The GEMM list is filtered by M
# (runtime.gemm_candidates_for).
# GEMV BLOCK_K stays <= 256: at 512 (int4 group 96/128 with uint8 zero-points, int2 group
# 128, float zero-points) ptxas spilled 5-12 KB per thread on sm_80 and sm_90 and each
# candidate took 28-72 s to compile (qtrain_kernels.compile_check).
_GEMV_CANDIDATES = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4}
    for bn in (16, 32, 64) for bk in (128, 256) for sk in (1, 4)
]
# GEMM candidates that compile without spills for sm_80 and sm_90 and fit at least two blocks
# per SM on both (compile_check --full, int4 group 128 with zero-points and int8 per channel;
# table: benchmarks/kernel_occupancy.md). Dropped for spilling: 16x128x256 (32 B/thread on
# sm_90), 32x128x128 (8 B, sm_90), 64x128x128 (152-160 B, sm_80), and at 8 warps 128x256x64
# (136-392 B), 128x128x128 (208 B, sm_80), 256x128x64 (2.9 KB on sm_80). Dropped for
# occupancy (issue 17: fewer than two blocks per SM and no GPU measurement showing them
# faster): the 8-warp 128x128x64 (232-255 registers x 256 threads, 1 block/SM on sm_80 and
# sm_90) and 64x256x64 (209-250 registers, 1 block/SM) tiles; they stay reachable as
# explicit configs, NAMED_CONFIGS.
_GEMM_CANDIDATES = [
    *({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4,
       "num_stages": 3} for bn, bk in ((64, 128), (128, 128), (64, 256))
      for sk in (1, 2, 4)),
    *({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4,
       "num_stages": 3} for bm, bn, bk in ((32, 64, 128), (64, 64, 64), (64, 128, 64))
      for sk in (1, 2)),
]
# Explicit launch configurations outside the autotune lists (``config=NAMED_CONFIGS[name]``):
# large 8-warp GEMM tiles that fit one block per SM (see above); for a GPU comparison.
NAMED_CONFIGS = {
    f"gemm_{bm}x{bn}x{bk}_w8": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1,
                                "num_warps": 8, "num_stages": 3}
    for bm, bn, bk in ((128, 128, 64), (64, 256, 64))
}
# GPU GEMM default above M = 256: the kept M > 256 candidate with the most blocks per SM
# (64x64x64, 4 warps: 3 blocks/SM on sm_80, 4 on sm_90); it was the 8-warp 128x128x64 tile
# (NAMED_CONFIGS["gemm_128x128x64_w8"], 1 block/SM).
LARGE_M_GEMM_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1,
                        "num_warps": 4, "num_stages": 3}


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
    lut: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through packed uniform / ternary / binary / lookup weights.

    ``packed`` (N, ceil(K/E)) int32, ``scales`` (N, K/G), ``zeros`` (N, K/G) uint8 (or float16
    / float32 for non-integer zero-points) or None (then ``zero`` is the implied zero-point),
    ``mode`` 'affine', 'binary' or 'lut' (``lut`` (1 or N, 2^c) float16/float32: W = lut[u] *
    s). ``config`` overrides the launch configuration (tests); otherwise it is autotuned per
    GPU.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
    c = container_bits(bits)
    check_tensor(x, "x", ACT_DTYPES, x.device, contiguous=False)
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
        check_tensor(zeros, "zeros", ZERO_DTYPES, dev, tuple(scales.shape))
    if mode == "lut":
        check_lut(lut, bits, n)
        check_tensor(lut, "lut", (torch.float16, torch.float32), dev)
    elif lut is not None:
        raise ValueError(f"lut is only used with mode='lut', got mode={mode!r}")
    e = 32 // c

    def per_config(cfg: dict) -> dict:
        if cfg["BLOCK_K"] % e:
            raise ValueError(f"config BLOCK_K={cfg['BLOCK_K']} must be a multiple of {e} "
                             f"(codes per int32 word at bits={bits})")
        return {"GROUP_SPAN": group_span(cfg["BLOCK_K"], g, n_groups == 1)}

    m = x2.shape[0]
    return splitk_linear(
        x, x2, (packed, scales, zeros if zeros is not None else scales,
                lut if lut is not None else scales),
        (packed.shape[1], scales.shape[1]), n, k, bias, gemv=_gemv_kernel, gemm=_gemm_kernel,
        flags={"BITS": c, "GROUP": g, "PER_CHANNEL": n_groups == 1, "MODE": MODES[mode],
               "HAS_Z": zeros is not None, "ZERO": float(zero),
               "LUT_PER_ROW": lut is not None and lut.shape[0] > 1},
        per_config=per_config,
        name="lowbit", key_extra=f"b{c}|g{g}|{mode}",
        candidates=(_GEMV_CANDIDATES, _GEMM_CANDIDATES),
        gemm_default=SMALL_M_GEMM_DEFAULT if m <= 16 else LARGE_M_GEMM_DEFAULT if m > 256 else {
            "BLOCK_M": 16 if m <= 32 else 64, "BLOCK_N": 128,
            "BLOCK_K": 128 if m <= 32 else 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
        config=config)


def lowbit_linear_reference(x, packed, scales, zeros=None, bias=None, *, bits, k,
                            mode="affine", zero=0.0, lut=None) -> torch.Tensor:
    """Pure torch: dequantize (fp32) -> round to x.dtype -> fp32 matmul -> x.dtype."""
    w = dequantize_uniform(packed, scales, zeros, bits, k, mode, zero, dtype=x.dtype, lut=lut)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
