"""Bit-serial AND-popcount matmul for k-bit activations x m-bit weights (DoReFa-Net).

Zhou et al. 2016, eq. (3): for unsigned codes ``a = sum_p 2^p a_p`` and ``u = sum_q 2^q u_q``
(bit planes a_p, u_q), ``a . u = sum_p sum_q 2^(p+q) popcount(and(a_p, u_q))``.
Inputs are bit planes packed 32 positions per int32 word (layout in
:mod:`qtrain_kernels.layout`). With affine maps ``x = sx (a - zx)``, ``w = sw (u - zw)``::

    y[m, n] = sx sw (a.u - zw sum(a) - zx sum(u) + K zx zw)

where ``sum(a) = sum_p 2^p popcount(a_p)``. DoReFa's activations are ``x = a / (2^k - 1)``
(``sx = 1/(2^k-1)``, ``zx = 0``) and its weights ``w = 2u / (2^m - 1) - 1``
(``sw = 2/(2^m-1)``, ``zw = (2^m-1)/2``).

popcount is written with plain bit operations (SWAR: pairwise, nibble, byte sums), since
Triton has no portable popcount intrinsic and the interpreter runs no inline asm. Integer
sums are int32: exact while ``K (2^k - 1)(2^m - 1) < 2^31``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import tile_offsets
from .layout import unpack_bitplanes
from .runtime import check_tensor, dual_jit, interpreting


@triton.jit
def popcount32(v):
    """Number of set bits of each int32 element (SWAR, Hacker's Delight 5-1)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    u = u + (u >> 8)
    u = u + (u >> 16)
    return (u & 0x3F).to(tl.int32)


def _bitserial_body(xp_ptr, wp_ptr, y_ptr, M, N, Kw, K, sx, zx, sw, zw,
                    ABITS: tl.constexpr, WBITS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rm, rn, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    sa = tl.zeros((BLOCK_M,), dtype=tl.int32)
    su = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for w0 in range(0, Kw, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        w_ok = rw < Kw
        for q in tl.static_range(WBITS):
            wq = tl.load(wp_ptr + q * N * Kw + rn[:, None] * Kw + rw[None, :],
                         mask=n_ok[:, None] & w_ok[None, :], other=0)
            su += tl.sum(popcount32(wq), axis=1) << q
        for p in tl.static_range(ABITS):
            xa = tl.load(xp_ptr + p * M * Kw + rm[:, None] * Kw + rw[None, :],
                         mask=m_ok[:, None] & w_ok[None, :], other=0)
            sa += tl.sum(popcount32(xa), axis=1) << p
            for q in tl.static_range(WBITS):
                wq = tl.load(wp_ptr + q * N * Kw + rn[:, None] * Kw + rw[None, :],
                             mask=n_ok[:, None] & w_ok[None, :], other=0)
                both = xa[:, None, :] & wq[None, :, :]
                dot += tl.sum(popcount32(both), axis=2) << (p + q)
    y = (dot.to(tl.float32) - zw * sa.to(tl.float32)[:, None]
         - zx * su.to(tl.float32)[None, :] + K * zx * zw) * (sx * sw)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


_bitserial = dual_jit(_bitserial_body)


def bitserial_matmul(
    xplanes: torch.Tensor, wplanes: torch.Tensor, k: int, *, x_scale: float = 1.0,
    x_zero: float = 0.0, w_scale: float = 1.0, w_zero: float = 0.0, config: dict | None = None,
) -> torch.Tensor:
    """``(M, N)`` float32 ``sum_k sx (a - zx) sw (u - zw)`` from bit planes.

    ``xplanes`` (k_bits, M, ceil(K/32)) and ``wplanes`` (m_bits, N, ceil(K/32)) int32.
    """
    dev = xplanes.device
    check_tensor(xplanes, "xplanes", (torch.int32,), dev)
    check_tensor(wplanes, "wplanes", (torch.int32,), dev)
    kw = -(-k // 32)
    if xplanes.dim() != 3 or xplanes.shape[2] != kw:
        raise ValueError(f"xplanes has shape {tuple(xplanes.shape)}; expected (bits, M, {kw})")
    if wplanes.dim() != 3 or wplanes.shape[2] != kw:
        raise ValueError(f"wplanes has shape {tuple(wplanes.shape)}; expected (bits, N, {kw})")
    abits, m, _ = xplanes.shape
    wbits, n, _ = wplanes.shape
    if not (1 <= abits <= 8 and 1 <= wbits <= 8):
        raise ValueError(f"bit planes: 1..8 bits supported, got {abits} x {wbits}")
    y = torch.empty(m, n, device=dev, dtype=torch.float32)
    if config is None:
        config = ({"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_W": 2} if interpreting(dev) else
                  {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_W": 8, "num_warps": 4})
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _bitserial[dev][grid](xplanes.contiguous(), wplanes.contiguous(), y, m, n, kw, k,
                          float(x_scale), float(x_zero), float(w_scale), float(w_zero),
                          ABITS=abits, WBITS=wbits, **config)
    return y


def bitserial_matmul_reference(xplanes, wplanes, k, *, x_scale=1.0, x_zero=0.0, w_scale=1.0,
                               w_zero=0.0) -> torch.Tensor:
    a = unpack_bitplanes(xplanes, k).double()
    u = unpack_bitplanes(wplanes, k).double()
    return ((x_scale * (a - x_zero)) @ (w_scale * (u - w_zero)).t()).float()
