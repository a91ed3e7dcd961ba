"""``sparse_shared`` packed format: a pruned + weight-shared layer of Deep Compression (Han,
Mao & Dally 2016, sec. 2-3, Fig. 2) stored as its relative-index stream and code stream.

Per layer (weight flattened row-major to ``(N, K)``, a conv weight to ``(out, in*kh*kw)``),
``E`` stored entries (the ``nnz`` surviving weights plus the filler zeros,
:func:`qtrain.quant.pruning.relative_index_stream`):

* ``ss_index`` int32 ``(ceil(E * index_bits / 32),)``: per entry ``z`` = zeros skipped
  since the previous entry (0 .. 2^index_bits - 1), ``index_bits`` bits per entry,
* ``ss_codes`` int32 ``(ceil(E * code_bits / 32),)``: per entry its code, 0 .. K - 1 a
  centroid, K the filler zero (the code reserved by
  :class:`qtrain.nn.shared_weight_quantizer.SharedWeightQuantizer`; with K = 2^b - 1 it is
  2^b - 1), ``code_bits = ceil(log2(K + 1))`` bits per entry,
* ``ss_codebook`` float32 ``(K,)``: the shared values, ``bias`` as the float layer,
* ``ss_meta`` int32 ``(6,)``: ``(N, K_in, nnz, E, code_bits, index_bits)``.

Bit streams: value ``i`` of a ``w``-bit stream occupies stream bits ``[i w, (i + 1) w)``,
stream bit ``j`` being bit ``j % 32`` of word ``j // 32`` (little-endian, least significant
bit first, a value may straddle two words; the padding after ``E w`` bits is 0). For
``w`` in 1 / 2 / 4 / 8 these are exactly the words of ``qtrain_kernels/layout.py``'s ``pack_codes``
of one row; :func:`pack_bits` packs every width 1..16.

Decoding: ``pos = cumsum(z + 1) - 1``; entries with code K are fillers and are dropped;
``W.flat[pos] = codebook[code]``, 0 elsewhere -- exactly the fake-quant weight ``C[codes]``
on the mask. The tensors hold ``E (index_bits + code_bits) + 32 K + 32 bias`` bits (the run
summary's ``shared_bits``) plus < 64 bits of word padding and the 192-bit ``ss_meta``.
Torch path only: the weight is decoded to a dense float matrix at every forward (no Triton
kernel for this format). This module is the format's codec (registered in
:mod:`qtrain.nn.packed_codecs`); the packer of ``SharedWeightQuantizer`` layers is in
:mod:`qtrain.nn.packed_formats`.
"""

from __future__ import annotations

import torch

from qtrain.quant import pruning as P
from qtrain_kernels import layout as L

FMT = "sparse_shared"
BUFFERS = ("ss_index", "ss_codes", "ss_codebook", "ss_meta")
META = ("out_features", "in_features", "nnz", "entries", "code_bits", "index_bits")
MAX_WIDTH = 16


def _check_width(width, name: str = "width") -> int:
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"{name}={width!r}; allowed: an int in 1..{MAX_WIDTH}")
    return width


def stream_words(n: int, width: int) -> int:
    """int32 words of a stream of ``n`` values of ``width`` bits."""
    return -(-n * width // 32)


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Exact bit stream of unsigned ``width``-bit ``values`` (1-D) -> int32 words (module
    doc). Vectorised: each value is split into its part in word ``i w // 32`` and the part
    that spills into the next word; disjoint bit fields, so adding them is OR-ing them."""
    _check_width(width)
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**width):
        raise ValueError(f"values must lie in [0, {2**width - 1}] for width={width}; got "
                         f"[{int(v.min())}, {int(v.max())}]")
    n = v.numel()
    off = torch.arange(n, device=v.device, dtype=torch.int64) * width
    word, shift = off // 32, off % 32
    out = torch.zeros(stream_words(n, width) + 1, dtype=torch.int64, device=v.device)
    out.index_add_(0, word, (v << shift) & 0xFFFFFFFF)
    out.index_add_(0, word + 1, v >> (32 - shift))  # 0 unless the value straddles
    return L.to_int32(out[:-1])


def unpack_bits(words: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words -> ``n`` int64 values."""
    _check_width(width)
    if words.dtype != torch.int32 or words.dim() != 1 or words.numel() != stream_words(n, width):
        raise ValueError(f"bit stream must be 1-D int32 with {stream_words(n, width)} words for "
                         f"{n} values of {width} bits; got {words.dtype} {tuple(words.shape)}")
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)])
    off = torch.arange(n, device=words.device, dtype=torch.int64) * width
    word, shift = off // 32, off % 32
    lo = w[word] >> shift
    hi = (w[word + 1] & (2**width - 1)) << (32 - shift)
    return (lo | hi) & (2**width - 1)


# ------------------------------------------------------------------------------ encode / decode
def encode(mask: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
           index_bits: int, name: str = "weight") -> dict[str, torch.Tensor]:
    """The format's buffers for a layer of keep-``mask``, ``codes`` (0 .. K - 1 on the
    mask) and K ``centroids`` (module doc)."""
    _check_width(index_bits, f"{name}: index_bits")
    k = centroids.numel()
    cb = _check_width(P.code_bits_for(k), f"{name}: code_bits (K = {k})")
    m2 = mask.reshape(mask.shape[0], -1)
    live = codes.reshape(-1)[mask.reshape(-1)]
    if live.numel() and not 0 <= int(live.min()) <= int(live.max()) < k:
        raise ValueError(f"{name}: codes of surviving weights must be in 0..{k - 1} (code {k} "
                         "is the filler code)")
    gaps, _, _ = P.relative_index_stream(mask, index_bits, name)
    sym = P.weight_symbols(mask, codes, k, index_bits)
    meta = (m2.shape[0], m2.shape[1], int(mask.sum()), gaps.numel(), cb, index_bits)
    return {"ss_index": pack_bits(gaps, index_bits), "ss_codes": pack_bits(sym, cb),
            "ss_codebook": centroids.detach().float().reshape(-1).contiguous(),
            "ss_meta": torch.tensor(meta, dtype=torch.int32, device=mask.device)}


def _meta(m) -> dict[str, int]:
    return dict(zip(META, (int(v) for v in m.ss_meta.tolist()), strict=True))


def _positions(m):
    """(flat positions, codes) of every stored entry of layer ``m``."""
    md = _meta(m)
    e = md["entries"]
    gaps = unpack_bits(m.ss_index, md["index_bits"], e)
    codes = unpack_bits(m.ss_codes, md["code_bits"], e)
    return torch.cumsum(gaps + 1, 0) - 1, codes


def dequantize(m) -> torch.Tensor:
    """float32 weight ``(N, K)``: ``codebook[code]`` at the decoded positions, fillers
    (code K) dropped, 0 elsewhere."""
    pos, codes = _positions(m)
    book = m.ss_codebook.float()
    real = codes != book.numel()
    w = torch.zeros(m.out_features * m.in_features, dtype=torch.float32, device=book.device)
    w[pos[real]] = book[codes[real]]
    return w.reshape(m.out_features, m.in_features)


def validate(m, want) -> None:
    """Lengths / shapes / dtypes of a loaded layer (``want(buffer, dtypes, shape)`` raises a
    ValueError naming the tensor) and the decoded stream's consistency."""
    want("ss_meta", (torch.int32,), (len(META),))
    md = _meta(m)
    where = f"sparse_shared layer ({m.out_features}x{m.in_features})"
    if (md["out_features"], md["in_features"]) != (m.out_features, m.in_features):
        raise ValueError(f"{where}: ss_meta shape ({md['out_features']}, {md['in_features']}) "
                         "differs from the layer's")
    for key in ("code_bits", "index_bits"):
        _check_width(md[key], f"{where}: {key}")
    if md["code_bits"] != m.bits:
        raise ValueError(f"{where}: ss_meta code_bits={md['code_bits']} != bits={m.bits}")
    e, nnz = md["entries"], md["nnz"]
    if not 0 <= nnz <= e or nnz > m.out_features * m.in_features:
        raise ValueError(f"{where}: nnz={nnz}, entries={e}; need 0 <= nnz <= entries and "
                         "nnz <= numel")
    book = getattr(m, "ss_codebook", None)
    k = book.numel() if isinstance(book, torch.Tensor) else 0
    if not 1 <= k < 2 ** md["code_bits"]:
        raise ValueError(f"{where}: codebook of {k} entries; need 1..2^code_bits - 1 = "
                         f"{2 ** md['code_bits'] - 1} (code K is the filler)")
    want("ss_codebook", (torch.float32,), (k,))
    want("ss_index", (torch.int32,), (stream_words(e, md["index_bits"]),))
    want("ss_codes", (torch.int32,), (stream_words(e, md["code_bits"]),))
    pos, codes = _positions(m)
    if e and (int(codes.max()) > k or int(pos[-1]) >= m.out_features * m.in_features):
        raise ValueError(f"{where}: stream decodes past the layer (last position "
                         f"{int(pos[-1])}) or holds codes > {k}")
    if int((codes != k).sum()) != nnz:
        raise ValueError(f"{where}: stream holds {int((codes != k).sum())} non-filler entries; "
                         f"ss_meta says nnz={nnz}")
