"""Real Huffman bit streams (Han et al. 2016, "Deep Compression", sec. 4) and the Deep
Compression file that stores them: the on-disk proof of the Huffman column.

:func:`qtrain.quant.size.huffman_bits` *counts* the bits of a stream under its Huffman code;
this module *writes* them. Codes are canonical (Schwartz & Kallick 1964; as DEFLATE, RFC 1951
sec. 3.2.2): from the code lengths of :func:`qtrain.quant.size.huffman_code_lengths`, symbols
sorted by (length, symbol) get consecutive code values, so a decoder needs only the lengths.
Bits are written most-significant first within a code, the stream is padded with 0 bits to
whole bytes (``numpy.packbits`` order).

File (:func:`write_dc_file` / :func:`read_dc_file`): ``b"QDCH"``, a little-endian uint32
header length, a UTF-8 JSON header (one row per layer: name, shape, nnz, E, index_bits, K,
the two streams' bit counts, whether a bias follows; and the payload's ``crc32``, zlib), then
each layer's blobs in order, their sizes implied by the row. Per layer:
its shape, ``nnz``, entries ``E`` (non-zeros + filler zeros), ``index_bits``, ``K``; the
Huffman-coded weight-code stream (codes 0 .. K - 1, filler code K) and relative-index stream
(:mod:`qtrain.quant.pruning`), each preceded by its code table (one byte per possible symbol:
its code length, 0 if absent; K + 1 and 2^index_bits bytes); the fp32 codebook and the fp32
bias as raw little-endian bytes. Parameters outside the compressed
layers are not in the file (it holds the compressed layers only). Stream bits are exactly
:func:`~qtrain.quant.size.huffman_bits` of each stream; the file adds < 1 byte of padding per
stream, the code tables and the JSON header.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import torch

from qtrain.errors import DataFileError
from qtrain.quant import pruning as P
from qtrain.quant.size import code_histogram, huffman_code_lengths

MAGIC = b"QDCH"
HEAD_KEYS = ("shape", "nnz", "entries", "index_bits", "K", "weight_bits", "index_bits_total",
             "bias")
MAX_LEN = 57  # longest code the uint64 packing handles (Huffman of < 2^39 symbols stays below)


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """{symbol: (code value, length)} of the canonical code with these lengths."""
    out, code, prev = {}, 0, 0
    for sym, ln in sorted(lengths.items(), key=lambda t: (t[1], t[0])):
        code <<= ln - prev
        out[sym] = (code, ln)
        code, prev = code + 1, ln
    return out


def encode(symbols: torch.Tensor) -> tuple[bytes, int, dict[int, int]]:
    """Huffman-code an integer stream: (bytes, number of bits, {symbol: code length})."""
    sym = symbols.detach().flatten().to(torch.int64).cpu().numpy()
    lengths = huffman_code_lengths(code_histogram(symbols))
    if not lengths:
        return b"", 0, {}
    table = canonical_codes(lengths)
    if max(ln for _, ln in table.values()) > MAX_LEN:
        raise ValueError(f"Huffman code longer than {MAX_LEN} bits")
    keys = np.array(sorted(table), dtype=np.int64)
    pos = np.searchsorted(keys, sym)
    code = np.array([table[k][0] for k in keys], dtype=np.uint64)[pos]
    ln = np.array([table[k][1] for k in keys], dtype=np.int64)[pos]
    width = int(ln.max())
    j = np.arange(width, dtype=np.int64)
    shift = (ln[:, None] - 1 - j[None, :]).clip(min=0).astype(np.uint64)
    bits = ((code[:, None] >> shift) & np.uint64(1)).astype(np.uint8)
    bits = bits[j[None, :] < ln[:, None]]  # row-major: each code's bits, MSB first
    return np.packbits(bits).tobytes(), int(ln.sum()), lengths


def decode(data: bytes, n_bits: int, lengths: dict[int, int], n: int) -> torch.Tensor:
    """Inverse of :func:`encode`: the first ``n`` symbols of the stream (int64)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    table = canonical_codes(lengths)
    lookup = {(ln, code): sym for sym, (code, ln) in table.items()}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n_bits].tolist()
    out, code, ln = [], 0, 0
    for b in bits:
        code, ln = (code << 1) | b, ln + 1
        sym = lookup.get((ln, code))
        if sym is not None:
            out.append(sym)
            code, ln = 0, 0
            if len(out) == n:
                break
    if len(out) != n or ln:
        raise DataFileError(f"Huffman stream of {n_bits} bits decoded to {len(out)} of {n} "
                            "symbols")
    return torch.tensor(out, dtype=torch.int64)


def layer_blobs(mask: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
                index_bits: int, bias: torch.Tensor | None, name: str = "weight"):
    """(header dict, [blobs]) of one pruned + shared layer (module docstring)."""
    k = int(centroids.numel())
    gaps, _, _ = P.relative_index_stream(mask, index_bits, name)
    sym = P.weight_symbols(mask, codes, k, index_bits)
    wb, wn, wl = encode(sym)
    ib, inb, il = encode(gaps)
    book = centroids.detach().float().cpu().numpy().astype("<f4").tobytes()
    bb = b"" if bias is None else bias.detach().float().cpu().numpy().astype("<f4").tobytes()
    head = {"shape": list(mask.shape), "nnz": int(mask.sum()), "entries": int(gaps.numel()),
            "index_bits": int(index_bits), "K": k, "weight_bits": wn, "index_bits_total": inb,
            "bias": bias is not None}
    return head, [_lengths_bytes(wl, k + 1), _lengths_bytes(il, 1 << index_bits), wb, ib, book, bb]


def _lengths_bytes(lengths: dict[int, int], n_symbols: int) -> bytes:
    """Code table: one byte per symbol 0 .. n_symbols - 1, its code length (0: absent)."""
    out = bytearray(n_symbols)
    for sym, ln in lengths.items():
        out[sym] = ln
    return bytes(out)


def _lengths_of(b: bytes) -> dict[int, int]:
    return {s: ln for s, ln in enumerate(b) if ln}


def write_dc_file(path, layers: dict[str, dict]) -> int:
    """Write the file (module docstring). ``layers``: {name: {mask, codes, centroids,
    index_bits, bias}}. Returns its size in bytes."""
    from qtrain.atomic_file import write_atomic

    heads, blobs = [], []
    for name, d in layers.items():
        head, parts = layer_blobs(d["mask"], d["codes"], d["centroids"], d["index_bits"],
                                  d.get("bias"), name)
        heads.append([name] + [head[k] for k in HEAD_KEYS])
        blobs.extend(parts)
    payload = b"".join(blobs)
    js = json.dumps({"keys": ["name", *HEAD_KEYS], "layers": heads,
                     "crc32": zlib.crc32(payload)}, separators=(",", ":")).encode()
    data = MAGIC + struct.pack("<I", len(js)) + js + payload
    write_atomic(data, path)
    return len(data)


def read_dc_file(path) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"weight": dense fp32 weight, "bias": fp32 bias or None}} from the file:
    the weight is rebuilt from the decoded streams alone (positions = cumsum(z + 1) - 1,
    fillers = code K dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC or len(data) < 8:
        raise DataFileError(f"{path}: not a Deep Compression Huffman file (magic {data[:4]!r})")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        top = json.loads(data[8:8 + n])
        heads = {row[0]: dict(zip(HEAD_KEYS, row[1:])) for row in top["layers"]}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DataFileError(f"{path}: unreadable header ({e})") from None
    base = 8 + n
    if zlib.crc32(data[base:]) != top.get("crc32"):
        raise DataFileError(f"{path}: payload CRC-32 mismatch (truncated or corrupt file)")
    out, off = {}, base
    for name, h in heads.items():
        e, k = h["entries"], h["K"]
        sizes = (k + 1, 1 << h["index_bits"], (h["weight_bits"] + 7) // 8,
                 (h["index_bits_total"] + 7) // 8, 4 * k, 4 * h["shape"][0] if h["bias"] else 0)
        parts = []
        for ln in sizes:
            parts.append(data[off: off + ln])
            off += ln
        wl, il, wb, ib, book, bb = parts
        sym = decode(wb, h["weight_bits"], _lengths_of(wl), e)
        gaps = decode(ib, h["index_bits_total"], _lengths_of(il), e)
        pos = torch.cumsum(gaps + 1, 0) - 1
        real = sym != k
        numel = int(np.prod(h["shape"]))
        if int(real.sum()) != h["nnz"] or (e and int(pos[-1]) >= numel):
            raise DataFileError(f"{path}: layer {name}: streams do not match nnz / shape")
        centroids = torch.from_numpy(np.frombuffer(book, dtype="<f4").copy())
        w = torch.zeros(numel, dtype=torch.float32)
        w[pos[real]] = centroids[sym[real]]
        bias = torch.from_numpy(np.frombuffer(bb, dtype="<f4").copy()) if h["bias"] else None
        out[name] = {"weight": w.reshape(h["shape"]), "bias": bias}
    if off != len(data):
        raise DataFileError(f"{path}: {len(data) - off} bytes after the last layer")
    return out
