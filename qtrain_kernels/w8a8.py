"""W8A8 linear: dynamic per-token int8 activations x per-channel int8 weights.

``y[m, n] = sx[m] * sw[n] * sum_k qx[m, k] qw[n, k] (+ bias)`` with the integer product on
int8 tensor cores (``tl.dot`` int8 x int8 -> int32), Jacob et al. 2018 eq. (4) with zero
points 0 (symmetric). Activations are quantized per row (token) at run time by a first
kernel: ``sx = max_k |x[m, k]| / 127``, ``qx = round_half_away(x / sx)`` in [-127, 127]
(as in LLM.int8() / SmoothQuant's dynamic per-token scheme; rounding half away from zero
because the interpreter has no rint, and the reference does the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import store_split_k, tile_offsets
from .runtime import (
    ACT_DTYPES,
    as_2d,
    check_tensor,
    choose_config,
    dual_jit,
    interpreting,
    m_bucket,
)


def _quant_rows_body(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-8) / 127.0
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32) / scale
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + rk, q.to(tl.int8), mask=rk < K)
    tl.store(s_ptr + row, scale)


def _w8a8_body(q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr, M, N, K,
               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    rm, rn, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(q_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0)
        b = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    store_split_k(y, y_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                  b_ptr, rn, n_ok, 0, HAS_BIAS, 1)


_quant_rows = dual_jit(_quant_rows_body)
_w8a8 = dual_jit(_w8a8_body)

# candidates that compile without spills for sm_80 and sm_90 and fit at least two blocks per
# SM on both (compile_check --full; benchmarks/kernel_occupancy.md); dropped for spilling:
# 128x256x128 and 256x128x128 at 8 warps (576-632 B per thread spilled on sm_80); dropped for
# occupancy (issue 17): 128x128x128 at 8 warps (246 registers x 256 threads, 1 block/SM on
# sm_80), kept as NAMED_CONFIGS.
_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in ((16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 128, 4, 3))
]
# Explicit launch configurations outside the autotune list (``config=NAMED_CONFIGS[name]``).
NAMED_CONFIGS = {
    "128x128x128_w8": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8,
                       "num_stages": 3},
}
# GPU default (autotuning off, CUDA-graph capture): the kept candidate of the old default's
# class (BLOCK_M >= 64) with the most blocks per SM: 64x128x128, 4 warps (2 blocks/SM on sm_80,
# 3 on sm_90); it was NAMED_CONFIGS["128x128x128_w8"] (1 block/SM on sm_80).
GPU_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def quantize_rows_int8(x2: torch.Tensor, block_k: int | None = None):
    """Per-row dynamic int8 quantization: returns (q (M, K) int8, scale (M,) float32)."""
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    bk = block_k or (32 if interpreting(x2.device) else 1024)
    _quant_rows[x2.device][(m,)](x2, q, s, k, x2.stride(0), BLOCK_K=bk)
    return q, s


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """``x (..., K)`` float -> ``(..., N)``; ``qweight`` (N, K) int8, ``wscale`` (N,) fp32."""
    check_tensor(x, "x", ACT_DTYPES, x.device, contiguous=False)
    dev = x.device
    check_tensor(qweight, "qweight", (torch.int8,), dev)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be (N, K), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_tensor(wscale, "wscale", (torch.float32,), dev, (n,))
    if bias is not None:
        check_tensor(bias, "bias", ACT_DTYPES, dev, (n,))
    x2 = as_2d(x, k)
    m = x2.shape[0]
    q, sx = quantize_rows_int8(x2)
    y = torch.empty(m, n, device=dev, dtype=x.dtype)

    def launch(cfg: dict) -> torch.Tensor:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w8a8[dev][grid](q, sx, qweight, wscale, bias if bias is not None else wscale, y,
                         m, n, k, HAS_BIAS=bias is not None, **cfg)
        return y

    if config is None:
        default = ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32} if interpreting(dev) else
                   GPU_DEFAULT)
        config = choose_config(f"w8a8|M{m_bucket(m)}|N{n}|K{k}|{x.dtype}", dev, _CANDIDATES,
                               default, launch)
    return launch(config).reshape(*x.shape[:-1], n)


def w8a8_linear_reference(x, qweight, wscale, bias=None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).float()
    sx = x2.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    v = x2 / sx[:, None]
    qx = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    acc = qx.double() @ qweight.double().t()  # exact integer sums
    y = acc.float() * sx[:, None] * wscale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
