"""The one bit layout of qtrain's packed weights (format version 1).

Every packed weight describes a matrix ``W`` of shape ``(N, K)`` = (out_features,
in_features), the layout of ``nn.Linear.weight`` (a conv weight is flattened to
``(out, in * kh * kw)``). Nothing is transposed.

Integer codes (``pack_codes`` / ``unpack_codes``)
    Codes are **unsigned** integers ``u`` in ``[0, 2^c)`` where ``c`` is the *container
    width*: 1, 2, 4 or 8 bits (3-bit codes travel in 4-bit containers, 5..7-bit codes in
    8-bit containers; :func:`container_bits`). Each row is packed along K into little-endian
    int32 words, ``E = 32 // c`` codes per word, least significant bits first::

        packed[n, k // E]  bits [c * (k % E), c * (k % E) + c)  =  u[n, k]

    so ``packed`` has shape ``(N, ceil(K / E))``, dtype ``torch.int32`` (bit 31 is the sign
    bit of the int32; read the words as uint32). Positions past K in the last word are 0.

Uniform (affine / symmetric) values, Jacob et al. 2018 eq. (1)
    ``W[n, k] = (u[n, k] - z[n, g]) * s[n, g]`` with group ``g = k // G``.
    ``scales``: ``(N, K // G)`` float16 (or float32), row n holds the groups of row n in
    order. Per-channel quantization is ``G = K`` (one group per row).
    ``zeros`` (asymmetric only): ``(N, K // G)`` uint8, the integer zero-point of the group,
    or float16 / float32 for a non-integer zero-point (DoReFa's ``(2^k - 1) / 2``, min-max
    offsets of DSQ or bucketed quantization that are not a whole number of steps).
    Symmetric: signed codes ``q in [-2^(b-1), 2^(b-1) - 1]`` are stored offset-binary,
    ``u = q + 2^(b-1)``, and no ``zeros`` tensor is stored (``z = 2^(b-1)`` implied).

Ternary (Li & Liu 2016, TWN): ``t in {-1, 0, +1}`` stored as ``u = t + 1`` in 2-bit
    containers with implied ``z = 1``; ``scales`` hold alpha per row (or per group).

Binary (Courbariaux 2016 / XNOR-Net, Rastegari 2016): ``sign in {-1, +1}`` stored as
    ``u = (sign + 1) / 2`` in 1-bit containers; ``W = (2u - 1) * alpha`` with alpha per row
    (``scales`` of shape ``(N, 1)``) or per group.

Lookup table (non-uniform scalar codes: TTQ's ``{-W_n, 0, W_p}``, learned quantization points)
    Codes ``u`` packed exactly as above; ``lut`` ``(T, 2^c)`` float16 or float32 with ``T = 1``
    (one table for the tensor) or ``T = N`` (one per row): ``W[n, k] = lut[t, u[n, k]] *
    s[n, g]`` with ``t = 0`` or ``t = n`` and ``scales`` as for uniform weights (all ones
    when the table holds the values themselves).

Codebook / product quantization (Jegou 2011; Stock et al. 2019, iPQ)
    Row n is cut into ``K / bs`` sub-vectors of ``bs`` consecutive input columns;
    ``codes[n, j]`` (uint8, shape ``(N, K // bs)``) indexes ``centroids`` (float16, shape
    ``(n_centroids <= 256, bs)``): ``W[n, j*bs:(j+1)*bs] = centroids[codes[n, j]]``.

Bit planes (DoReFa bit-serial dot product, Zhou et al. 2016 eq. (3))
    A ``(R, K)`` matrix of c-bit unsigned codes is stored as ``(c, R, ceil(K / 32))`` int32:
    bit ``j`` of word ``w`` of plane ``p`` is bit ``p`` of ``code[r, 32 w + j]``.

W8A8 (per-token dynamic int8 activations, per-channel int8 weights)
    weight ``(N, K)`` int8 (symmetric, ``q in [-127, 127]``), ``scales`` ``(N,)`` float32.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
LAYOUT = "qtrain-int32-lsb-first-rowmajor-v1"
CONTAINERS = (1, 2, 4, 8)


def container_bits(bits: int) -> int:
    """Smallest container width in {1, 2, 4, 8} holding ``bits``-bit codes."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} not supported; allowed: 1..8")
    return next(c for c in CONTAINERS if c >= bits)


def packed_words(k: int, bits: int) -> int:
    e = 32 // container_bits(bits)
    return -(-k // e)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``(N, K)`` into int32 words ``(N, ceil(K / E))`` (module doc)."""
    c = container_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    c64 = codes.to(torch.int64)
    if c64.numel() and (int(c64.min()) < 0 or int(c64.max()) >= 2**c):
        raise ValueError(
            f"codes must lie in [0, {2**c - 1}] for bits={bits}; got "
            f"[{int(c64.min())}, {int(c64.max())}]"
        )
    n, k = c64.shape
    e = 32 // c
    kw = -(-k // e)
    c64 = torch.nn.functional.pad(c64, (0, kw * e - k))
    shifts = torch.arange(e, device=codes.device, dtype=torch.int64) * c
    words = (c64.reshape(n, kw, e) << shifts).sum(-1)  # disjoint bit fields: sum == or
    return to_int32(words)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(N, Kw)`` int32 -> ``(N, k)`` int64 codes."""
    c = container_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(
            f"packed must be a 2-D torch.int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    e = 32 // c
    if packed.shape[1] != -(-k // e):
        raise ValueError(
            f"packed has {packed.shape[1]} words per row; K={k} at {c}-bit containers needs "
            f"{-(-k // e)}"
        )
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(e, device=packed.device, dtype=torch.int64) * c
    u = (w.unsqueeze(-1) >> shifts) & (2**c - 1)
    return u.reshape(packed.shape[0], -1)[:, :k]


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``(R, K)`` -> bit planes ``(bits, R, ceil(K / 32))``."""
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be a 2-D integer tensor, got {codes.dtype} {codes.shape}")
    c64 = codes.to(torch.int64)
    if c64.numel() and (int(c64.min()) < 0 or int(c64.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    planes = [pack_codes((c64 >> p) & 1, 1) for p in range(bits)]
    return torch.stack(planes)


def unpack_bitplanes(planes: torch.Tensor, k: int) -> torch.Tensor:
    bits = planes.shape[0]
    out = torch.zeros(planes.shape[1], k, dtype=torch.int64, device=planes.device)
    for p in range(bits):
        out |= unpack_codes(planes[p], 1, k) << p
    return out


def check_groups(k: int, group_size: int | None) -> int:
    """Effective group size (``None`` -> per channel, G = K); validates divisibility."""
    g = k if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or k % g:
        raise ValueError(
            f"group_size={group_size!r} must be a positive int dividing K={k} "
            "(or None for per-channel)"
        )
    return g


def dequantize_uniform(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    k: int,
    mode: str = "affine",
    zero: float = 0.0,
    dtype: torch.dtype = torch.float32,
    lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dequantization of the uniform / ternary / binary / lookup-table layouts.

    ``mode``: 'affine' (``(u - z) * s`` with ``zeros`` or the implied constant ``zero``),
    'binary' (``(2u - 1) * s``) or 'lut' (``lut[t, u] * s``, module doc). Computed in
    float32, returned as ``dtype``.
    """
    codes = unpack_codes(packed, bits, k)
    u = codes.to(torch.float32)
    n_groups = scales.shape[1]
    g = check_groups(k, k // n_groups)
    s = scales.to(torch.float32).repeat_interleave(g, dim=1)
    if mode == "binary":
        w = (2 * u - 1) * s
    elif mode == "affine":
        z = zero if zeros is None else zeros.to(torch.float32).repeat_interleave(g, dim=1)
        w = (u - z) * s
    elif mode == "lut":
        check_lut(lut, bits, packed.shape[0])
        table = lut.to(torch.float32).expand(packed.shape[0], -1)
        w = torch.gather(table, 1, codes) * s
    else:
        raise ValueError(f"mode={mode!r}; allowed: 'affine', 'binary', 'lut'")
    return w.to(dtype)


def check_lut(lut: torch.Tensor | None, bits: int, n: int) -> None:
    """A lookup table must be ``(1, 2^c)`` or ``(N, 2^c)`` float16 / float32 (module doc)."""
    size = 2 ** container_bits(bits)
    if not isinstance(lut, torch.Tensor):
        raise ValueError(f"mode='lut' needs lut=<({n} or 1, {size}) float tensor>, got {lut!r}")
    if (lut.dim() != 2 or lut.shape[0] not in (1, n) or lut.shape[1] != size
            or lut.dtype not in (torch.float16, torch.float32)):
        raise ValueError(f"lut has shape {tuple(lut.shape)} dtype {lut.dtype}; expected "
                         f"(1, {size}) or ({n}, {size}) float16/float32 for bits={bits}")


def dequantize_codebook(
    codes: torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference: ``W[n, j*bs:(j+1)*bs] = centroids[codes[n, j]]``."""
    n = codes.shape[0]
    return centroids.to(dtype)[codes.long()].reshape(n, -1)
