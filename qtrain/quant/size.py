"""Size accounting: exact storage bits per layer and an entropy-coded (Huffman) estimate.

:func:`model_storage_bits` walks a model. A module with a no-argument ``storage_bits()``
method (fake-quant layers, PQ layers, packed layers) reports the bits of everything it owns
(codes + scales/zero-points/codebooks + its unquantized tensors, by that layer's own
convention) and its whole subtree is then skipped. Every other parameter and buffer counts
``numel * element_size * 8`` (its dtype's width; bool = 8 bits); shared tensors count once.
Quantizer modules (``storage_bits(weight)`` takes the weight) are reported by their layer.

Tied weights (e.g. an LM's embedding and output projection sharing one Parameter) count
once: a self-reporting layer whose stored weight -- the ``centroids`` of a PQ layer, else its
``weight`` Parameter -- was already counted by an earlier layer *with the same quantization*
(same codebook and assignments; or same weight-quantizer type, bits, mode and block size)
adds only its own tensors not yet counted (e.g. its bias), weight-quantizer state excluded.
Two layers that quantize one float Parameter differently store two tensors and both count.

Huffman estimate (Han et al. 2016, "Deep Compression", Sec. 4): the dense ``b``-bit codes
of a layer are replaced by a Huffman code built from the code histogram
(:func:`huffman_code_lengths`, heapq); the side information (scales, codebooks, bias)
is unchanged and the code table itself (at most 2^b lengths) is not counted.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import nn


def tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


@dataclass
class LayerBits:
    name: str
    kind: str
    numel: int
    bits: int


@dataclass
class StorageReport:
    """``total_bits`` and one row per reporting module (``layers``)."""

    total_bits: int
    layers: list[LayerBits] = field(default_factory=list)
    float32_bits: int = 0  # every parameter and buffer element at 32 bits

    @property
    def total_bytes(self) -> float:
        return self.total_bits / 8

    @property
    def compression(self) -> float:
        return self.float32_bits / self.total_bits if self.total_bits else float("nan")

    def as_dict(self) -> dict:
        return {"total_bits": self.total_bits, "total_bytes": self.total_bytes,
                "float32_bits": self.float32_bits, "compression": self.compression,
                "layers": {r.name: r.bits for r in self.layers}}

    def table(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'type':<18} {'numel':>10} {'bits':>12} {'bits/elem':>9}"]
        for r in self.layers:
            per = r.bits / r.numel if r.numel else float("nan")
            lines.append(f"{r.name:<{w}}  {r.kind:<18} {r.numel:>10} {r.bits:>12} {per:>9.3f}")
        lines.append(f"{'total':<{w}}  {'':<18} {'':>10} {self.total_bits:>12}  "
                     f"({self.total_bytes / 2**20:.3f} MiB, {self.compression:.2f}x vs fp32)")
        return "\n".join(lines)


def _reports_itself(m: nn.Module) -> bool:
    from qtrain.nn.quantizer_base import Quantizer

    return callable(getattr(m, "storage_bits", None)) and not isinstance(m, Quantizer)


def _stored_weight(m: nn.Module):
    """(tensor that holds the layer's stored weight, how it is quantized) or (None, None)."""
    c = getattr(m, "centroids", None)
    if isinstance(c, torch.Tensor):
        a = getattr(m, "assignments", None)
        return c, ("pq", id(a))
    w = m._parameters.get("weight")
    if w is None:
        return None, None
    wq = getattr(m, "weight_quantizer", None)
    sig = None if wq is None else (type(wq).__name__, getattr(wq, "bits", None),
                                   getattr(wq, "enabled", True), getattr(wq, "mode", None),
                                   getattr(wq, "block_size", None))
    return w, sig


def _walk(model: nn.Module, layer_bits):
    """Shared walk: ``layer_bits(name, module) -> int`` for self-reporting modules."""
    rows, seen, skip = [], set(), []
    counted: dict[int, object] = {}  # id(stored weight) -> quantization it was counted with
    f32 = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            f32 += 32 * t.numel()
    seen = set()
    for name, m in model.named_modules():
        if any(s == "" or name == s or name.startswith(s + ".") for s in skip):
            continue
        if _reports_itself(m):
            named = list(m.named_parameters()) + list(m.named_buffers())
            key, sig = _stored_weight(m)
            if key is not None and id(key) in counted and counted[id(key)] == sig:
                own = [t for n, t in named if id(t) not in seen
                       and not n.startswith("weight_quantizer.")]
                bits, kind = sum(tensor_bits(t) for t in own), type(m).__name__ + " (tied)"
            else:
                bits, kind = int(layer_bits(name, m)), type(m).__name__
                if key is not None:
                    counted[id(key)] = sig
            seen.update(id(t) for _, t in named)
            rows.append(LayerBits(name or "<model>", kind,
                                  sum(t.numel() for t in m.parameters()), bits))
            skip.append(name)
            continue
        own = [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
               if id(t) not in seen]
        if own:
            seen.update(id(t) for t in own)
            rows.append(LayerBits(name or "<model>", type(m).__name__,
                                  sum(t.numel() for t in own), sum(tensor_bits(t) for t in own)))
    return StorageReport(sum(r.bits for r in rows), rows, f32)


def model_storage_bits(model: nn.Module) -> StorageReport:
    """Exact storage of ``model`` (module docstring); ``.total_bits``, ``.table()``."""
    return _walk(model, lambda name, m: m.storage_bits())


# ---------------------------------------------------------------------------------------
# Huffman / entropy
# ---------------------------------------------------------------------------------------

def code_histogram(codes: torch.Tensor) -> dict[int, int]:
    vals, counts = torch.unique(codes.detach().flatten().to(torch.int64), return_counts=True)
    return dict(zip(vals.tolist(), counts.tolist()))


def huffman_code_lengths(counts) -> dict:
    """Huffman code length per symbol from a {symbol: count} mapping (or a sequence of
    counts, symbols = indices). Zero counts are dropped; one symbol gets length 1."""
    if not isinstance(counts, dict):
        counts = dict(enumerate(counts.tolist() if torch.is_tensor(counts) else counts))
    counts = {s: c for s, c in counts.items() if c > 0}
    if not counts:
        return {}
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    # heap of (weight, tie-break, symbols in the subtree); merging adds 1 to their depth
    heap = [(c, i, [s]) for i, (s, c) in enumerate(counts.items())]
    heapq.heapify(heap)
    depth = dict.fromkeys(counts, 0)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return depth


def huffman_bits(codes: torch.Tensor) -> int:
    """Bits of ``codes`` (integer tensor) under its own Huffman code."""
    hist = code_histogram(codes)
    lengths = huffman_code_lengths(hist)
    return sum(hist[s] * lengths[s] for s in hist)


def entropy_bits(codes: torch.Tensor) -> float:
    """N * H(empirical code distribution): the lower bound of any prefix code."""
    hist = code_histogram(codes)
    n = sum(hist.values())
    return -sum(c * math.log2(c / n) for c in hist.values())


def _codes_of(m: nn.Module):
    """(integer codes, dense bits per code) of a layer's stored weight, or None."""
    wq = getattr(m, "weight_quantizer", None)
    if wq is not None and getattr(wq, "enabled", True):
        if callable(getattr(wq, "codes", None)):
            return wq.codes(m.weight.detach()), wq.bits
        if callable(getattr(wq, "export_qparams", None)):
            return wq.export_qparams(m.weight.detach())["codes"], wq.bits
    assign = getattr(m, "assignments", None)
    k = getattr(m, "n_centroids", None)
    if torch.is_tensor(assign) and k:
        return assign, math.ceil(math.log2(k))
    return None


def model_huffman_bits(model: nn.Module) -> StorageReport:
    """:func:`model_storage_bits` with each layer's dense codes Huffman-coded. A weight
    quantizer with several streams (a sparse layer's codes *and* relative indices, Deep
    Compression sec. 4) reports its own entropy-coded size through
    ``huffman_storage_bits(weight)``, which replaces its ``storage_bits(weight)``."""

    def bits(name, m):
        dense = m.storage_bits()
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and getattr(wq, "enabled", True) and callable(
                getattr(wq, "huffman_storage_bits", None)):
            w = m.weight.detach()
            return dense - wq.storage_bits(w) + wq.huffman_storage_bits(w)
        got = _codes_of(m)
        if got is None:
            return dense
        codes, b = got
        return dense - b * codes.numel() + huffman_bits(codes)

    return _walk(model, bits)
