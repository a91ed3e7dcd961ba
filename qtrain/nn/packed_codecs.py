"""Decoders, own forwards and load checks of every packed format, registered in
:data:`qtrain.nn.packed_registry.FORMATS` (the formats themselves: :mod:`qtrain.nn.packed`,
:mod:`qtrain.nn.packed_formats`, :mod:`qtrain.nn.packed_rq`, :mod:`qtrain.nn.packed_sparse`;
bit layout: ``qtrain_kernels/layout.py``).

Everything here reads a packed layer duck-typed (its ``fmt``, sizes and buffers), so this
module sits below :mod:`qtrain.nn.packed`, which imports it: every format is registered
before any packed layer exists. Builders of packed layers are above it
(:mod:`qtrain.nn.packed`, :mod:`qtrain.nn.packed_formats`, :mod:`qtrain.nn.packed_rq`).

Validators take ``(layer, want)``: ``want(buffer, dtypes, shape)`` raises naming the tensor,
``want.fail(rest)`` raises a file error ``"<layer><rest>"``; a plain ValueError names the
problem and the loader adds the file and layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtrain.nn import packed_sparse
from qtrain.nn.packed_registry import Format, register_format
from qtrain_kernels import layout as L
from qtrain_kernels.codebook_matmul import codebook_linear
from qtrain_kernels.w8a8 import w8a8_linear, w8a8_linear_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.int16, torch.int32)
_UNIFORM_BUFFERS = ("packed", "scales", "zeros")


def pow2_values(codes: torch.Tensor, n1: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`qtrain.nn.packed.pow2_codes`: float32 weights (exact powers of two
    and zeros)."""
    e = codes & (2 ** (bits - 1) - 1)
    sign = torch.where(codes >= 2 ** (bits - 1), -1.0, 1.0)
    mag = torch.where(e > 0, torch.exp2((n1 + 1 - e).float()), 0.0)
    return sign * mag


def index_bits(numel: int) -> int:
    return max(1, math.ceil(math.log2(numel))) if numel > 1 else 1


# ------------------------------------------------------------------ uniform / ternary / binary
def _validate_uniform(m, want) -> None:
    n, k = m.out_features, m.in_features
    ng = k // (m.group_size or k)
    want("packed", (torch.int32,), (n, L.packed_words(k, L.container_bits(m.bits))))
    want("scales", (torch.float16, torch.float32), (n, ng))
    if m.fmt == "uniform" and not m.symmetric:
        want("zeros", (torch.uint8, torch.float16, torch.float32), (n, ng))


# ------------------------------------------------------------------ codebook (PQ / k-means)
def _dequantize_codebook(m) -> torch.Tensor:
    if m.centroids.dim() == 3:  # one codebook per segment
        seg = torch.arange(m.codes.shape[1], device=m.codes.device)
        return m.centroids.float()[seg, m.codes.long()].reshape(m.out_features, -1)
    return L.dequantize_codebook(m.codes, m.centroids)


def _linear_codebook(m, x, bias, use_kernel: bool) -> torch.Tensor:
    if use_kernel and m.centroids.dim() != 3:  # per-segment codebooks: torch path only
        return codebook_linear(x, m.codes, m.centroids, bias)
    return F.linear(x, m.dequantize().to(x.dtype), bias)


def _validate_codebook(m, want) -> None:
    n, k = m.out_features, m.in_features
    want("codes", (torch.uint8,), (n, k // m.group_size))
    segs = (k // m.group_size,) if m.centroids.dim() == 3 else ()  # per-segment books
    want("centroids", (torch.float16,), (*segs, m.centroids.shape[-2], m.group_size))
    if m.codes.numel() and int(m.codes.max()) >= m.centroids.shape[-2]:
        want.fail(f".codes holds {int(m.codes.max())}; only {m.centroids.shape[-2]} centroids")


# ------------------------------------------------------------------ w8a8
def _dequantize_w8a8(m) -> torch.Tensor:
    return m.qweight.float() * m.wscale[:, None]


def _linear_w8a8(m, x, bias, use_kernel: bool) -> torch.Tensor:
    if use_kernel:
        return w8a8_linear(x, m.qweight, m.wscale, bias)
    return w8a8_linear_reference(x, m.qweight, m.wscale, bias)


def _validate_w8a8(m, want) -> None:
    want("qweight", (torch.int8,), (m.out_features, m.in_features))
    want("wscale", (torch.float32,), (m.out_features,))


# ------------------------------------------------------------------ pow2 (INQ)
def _dequantize_pow2(m) -> torch.Tensor:
    return pow2_values(m.pow2_codes(), int(m.n1[0]), m.bits)


def _validate_pow2(m, want) -> None:
    n, k = m.out_features, m.in_features
    if not isinstance(m.bits, int) or not 2 <= m.bits <= 8:
        want.fail(f" has pow2 bits={m.bits!r}; allowed 2..8")
    want("planes", (torch.int32,), (m.bits, 1, -(-(n * k) // 32)))
    want("n1", (torch.int8,), (1,))
    e_max = int((m.pow2_codes() & (2 ** (m.bits - 1) - 1)).max()) if n * k else 0
    if e_max > 2 ** (m.bits - 2):
        want.fail(f" has power-of-two exponent index {e_max}; {m.bits}-bit INQ codes allow "
                  f"0..{2 ** (m.bits - 2)}")


# ------------------------------------------------------------------ lut
def _validate_lut(m, want) -> None:
    n, k = m.out_features, m.in_features
    c = L.container_bits(m.bits)
    want("packed", (torch.int32,), (n, L.packed_words(k, c)))
    want("scales", (torch.float16, torch.float32), (n, 1))
    t = m.lut.shape[0] if getattr(m, "lut", None) is not None else 1
    want("lut", (torch.float16, torch.float32), (t if t in (1, n) else 1, 2**c))


# ------------------------------------------------------------------ float
def _dequantize_float(m) -> torch.Tensor:
    w = m.fweight.float()
    if hasattr(m, "s2fp8"):
        alpha, beta = m.s2fp8[0], m.s2fp8[1]
        ok = w != 0
        log_yh = torch.log2(torch.where(ok, w.abs(), torch.ones_like(w)))
        mag = torch.exp2((log_yh - beta) / alpha)
        return torch.where(ok, torch.copysign(mag, w), torch.zeros_like(w))
    if hasattr(m, "fscale"):
        return w * m.fscale
    return w


def _validate_float(m, want) -> None:
    want("fweight", FLOAT_DTYPES, (m.out_features, m.in_features))
    for b, size in (("fscale", 1), ("s2fp8", 2)):
        if b in m._buffers:
            want(b, (torch.float32,), (size,))


# ------------------------------------------------------------------ value_aware
def _dequantize_value_aware(m) -> torch.Tensor:
    dense = L.dequantize_uniform(m.packed, m.scales, getattr(m, "zeros", None),
                                 L.container_bits(m.bits), m.in_features, **m._uniform_args())
    idx = L.unpack_bitplanes(m.sp_index, m.sp_values.numel()).reshape(-1)
    return dense.reshape(-1).index_copy(0, idx, m.sp_values.float()).reshape(dense.shape)


def _validate_value_aware(m, want) -> None:
    n, k = m.out_features, m.in_features
    c = L.container_bits(m.bits)
    want("packed", (torch.int32,), (n, L.packed_words(k, c)))
    want("scales", (torch.float16, torch.float32), (n, 1))
    if not m.symmetric:
        want("zeros", (torch.uint8,), (n, 1))
    cnt = m.n_outliers
    want("sp_values", (torch.float32,), (cnt,))
    want("sp_index", (torch.int32,), (index_bits(n * k), 1, -(-cnt // 32)))
    idx = L.unpack_bitplanes(m.sp_index, cnt).reshape(-1)
    if cnt and (int(idx[-1]) >= n * k or not bool((idx[1:] > idx[:-1]).all())):
        raise ValueError(f"value_aware layer: outlier indices must be increasing and "
                         f"< numel {n * k}")


# ------------------------------------------------------------------ bucketed
def _dequantize_bucketed(m) -> torch.Tensor:
    if "lut" in m._buffers:  # Polino differentiable (packed_formats module doc)
        u = L.unpack_codes(m.packed, L.container_bits(m.bits), m.group_size)
        w = m.lut[0].float()[u] * m.scales + m.zeros
        return w.reshape(-1)[:m.out_features * m.in_features].reshape(m.out_features, -1)
    w = L.dequantize_uniform(m.packed, m.scales, m.zeros, L.container_bits(m.bits),
                             m.group_size)
    return w.reshape(-1)[:m.out_features * m.in_features].reshape(m.out_features, -1)


def _validate_bucketed(m, want) -> None:
    n, k = m.out_features, m.in_features
    bs = m.group_size
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bucketed layer: bucket size (group_size) {bs!r} must be an int >= 1")
    nb = -(-n * k // bs)
    want("packed", (torch.int32,), (nb, L.packed_words(bs, L.container_bits(m.bits))))
    want("scales", (torch.float32,), (nb, 1))
    want("zeros", (torch.float32,), (nb, 1))
    if "lut" in m._buffers:
        want("lut", (torch.float32,), (1, 2**L.container_bits(m.bits)))


# ------------------------------------------------------------------ rq (qtrain.nn.packed_rq)
def _dequantize_rq(m) -> torch.Tensor:
    """float32 weight (N, K): the sum over stages of the gathered centroids."""
    books, codes = m.centroids.float(), m.codes.long()
    stage = torch.arange(books.shape[0], device=codes.device)[:, None, None]
    return books[stage, codes].sum(0).reshape(m.out_features, m.in_features)


def _linear_rq(m, x: torch.Tensor, bias, use_kernel: bool) -> torch.Tensor:
    if not use_kernel:
        return F.linear(x, _dequantize_rq(m).to(x.dtype), bias)
    y = None
    for s in range(m.codes.shape[0]):
        part = codebook_linear(x, m.codes[s], m.centroids[s], bias if s == 0 else None).float()
        y = part if y is None else y + part
    return y.to(x.dtype)


def _validate_rq(m, want) -> None:
    """Shapes / dtypes / code range of a loaded ``rq`` layer."""
    n, k, bs = m.out_features, m.in_features, m.group_size
    if not isinstance(bs, int) or bs < 1 or k % bs:
        raise ValueError(f"rq layer: block size (group_size) {bs!r} must divide K={k}")
    stages = getattr(m, "n_stages", None)
    cents = getattr(m, "centroids", None)
    kc = cents.shape[1] if isinstance(cents, torch.Tensor) and cents.dim() == 3 else 0
    if not 1 <= kc <= 256:
        raise ValueError(f"rq layer: centroids {getattr(cents, 'shape', None)} must be "
                         "(M, 1..256, bs)")
    want("centroids", (torch.float16,), (stages, kc, bs))
    want("codes", (torch.uint8,), (stages, n, k // bs))
    if m.codes.numel() and int(m.codes.max()) >= kc:
        raise ValueError(f"rq layer: code {int(m.codes.max())} out of range for {kc} centroids")


# ------------------------------------------------------------------ the registry entries
# (registration order = the order PackedLinear's "allowed" message lists them)
for _name in ("uniform", "ternary", "binary"):
    register_format(Format(_name, _validate_uniform, _UNIFORM_BUFFERS))
register_format(Format("codebook", _validate_codebook, ("codes", "centroids"),
                       _dequantize_codebook, _linear_codebook))
register_format(Format("w8a8", _validate_w8a8, ("qweight", "wscale"), _dequantize_w8a8,
                       _linear_w8a8))
register_format(Format("pow2", _validate_pow2, ("planes", "n1"), _dequantize_pow2,
                       torch_only=True))
register_format(Format("lut", _validate_lut, (*_UNIFORM_BUFFERS, "lut")))
register_format(Format("float", _validate_float, ("fweight", "fscale", "s2fp8"),
                       _dequantize_float, torch_only=True))
register_format(Format("value_aware", _validate_value_aware,
                       (*_UNIFORM_BUFFERS, "sp_index", "sp_values"), _dequantize_value_aware,
                       torch_only=True, spec={"n_outliers": lambda m: m.sp_values.numel()}))
register_format(Format("bucketed", _validate_bucketed, (*_UNIFORM_BUFFERS, "lut"),
                       _dequantize_bucketed, torch_only=True))
register_format(Format("rq", _validate_rq, ("codes", "centroids"), _dequantize_rq, _linear_rq,
                       spec={"n_stages": lambda m: m.codes.shape[0]}))
register_format(Format(packed_sparse.FMT, packed_sparse.validate, packed_sparse.BUFFERS,
                       packed_sparse.dequantize, torch_only=True))
