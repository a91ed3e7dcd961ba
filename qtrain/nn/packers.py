"""Packers of the uniform-family quantizers and of the layer kinds, registered in
:mod:`qtrain.nn.packed_registry` (the learned / float / sparse quantizers' packers:
:mod:`qtrain.nn.packed_formats`).

Layer kinds (:data:`~qtrain.nn.packed_registry.LAYERS`, tried in this order by
:func:`qtrain.export.pack_model`):

* PQ linear layers (duck-typed: ``centroids`` (n_centroids x bs), ``assignments``,
  ``block_size``, ``weight_from_codebook()``; PQConv2d / PQEmbedding are not packed) ->
  ``codebook``,
* residual-quantized layers (:mod:`qtrain.nn.rq_layers`, Gong et al. 2014) -> ``rq``
  (:mod:`qtrain.nn.packed_rq`),
* fake-quant Linear / Conv2d / Embedding layers -> the packer of their weight quantizer
  (:func:`~qtrain.nn.packed_registry.packer_for`); an embedding whose quantizer's packer does
  not pack embeddings (or that has none) is left as it is; the packed layer keeps the trained
  activation quantizer,
* plain ``nn.Linear`` layers with ``bits`` -> min-max ``uniform``.

Quantizer packers here (:data:`~qtrain.nn.packed_registry.PACKERS`): ``UniformQuantizer`` and
its subclasses and LSQ (``export_qparams``: the trained codes and scales), Q-BERT
``GroupwiseQuantizer`` (each group a block of whole rows: per-row scales), INQ
``PowerOfTwoQuantizer`` (``pow2``), Quant-Noise (its p = 1 model), and any other quantizer
with ``export_qparams`` (a protocol entry). See :mod:`qtrain.export` for each one's format.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.nn.fake_quant import QuantConv2d, QuantEmbedding, QuantLinear
from qtrain.nn.format_quantizers import PowerOfTwoQuantizer
from qtrain.nn.groupwise_quantizer import GroupwiseQuantizer
from qtrain.nn.learned_quantizers import LSQQuantizer
from qtrain.nn.packed import PackedConv2d, PackedLinear
from qtrain.nn.packed_registry import (
    LayerKind,
    Packer,
    packable_labels,
    packer_for,
    register_layer,
    register_packer,
)
from qtrain.nn.packed_rq import from_rq_module
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.nn.rq_layers import RQConv2d, is_rq
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import uniform as U


def uniform_layer(codes, scale, zero, bits, symmetric, group, k, bias, backend, scale_dtype):
    """``uniform`` layer (:meth:`PackedLinear.from_qparams`) of at most 8-bit codes."""
    if bits > 8:
        raise ValueError(f"uniform format holds at most 8-bit codes, got bits={bits}")
    return PackedLinear.from_qparams(codes, scale, zero, bits, symmetric, group, k, bias,
                                     backend, scale_dtype)


def unpackable_message(bad: list[tuple[str, str]]) -> str:
    names = ", ".join(f"{n} ({t})" for n, t in bad[:4]) + (" ..." if len(bad) > 4 else "")
    return (f"export: {len(bad)} layer(s) have weight quantizers with no packed format: {names}; "
            f"packable: {', '.join(packable_labels())} -- run without export=true")


# ------------------------------------------------------------------------------ PQ layers
def has_codebook(m: nn.Module) -> bool:
    """Any PQ layer (duck-typed: centroids, assignments, block_size, weight_from_codebook)."""
    return all(hasattr(m, a) for a in ("centroids", "assignments", "block_size",
                                        "weight_from_codebook"))


def is_pq(m: nn.Module) -> bool:
    """PQ *linear* layers (PQConv2d / PQEmbedding are kept as they are: not yet packed)."""
    return has_codebook(m) and hasattr(m, "in_features") and not any(
        hasattr(m, a) for a in ("kernel_size", "num_embeddings"))


def pq_codes(m: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K/bs), centroids) of a PQ layer, in our row-major layout.

    The assignment order is found by matching ``weight_from_codebook()``: row-major
    (block j of row n at n * K/bs + j) or fairseq's column-major (j * N + n).
    """
    c = m.centroids.detach().float()
    a = m.assignments.detach().long().reshape(-1)
    w = m.weight_from_codebook().detach().float()
    n = w.shape[0]
    wf = w.reshape(n, -1)
    bs = int(m.block_size)
    if wf.shape[1] % bs or a.numel() != wf.numel() // bs:
        raise ValueError(f"{name}: block_size={bs} does not tile weight {tuple(w.shape)}")
    kc = wf.shape[1] // bs
    if c.dim() == 3:  # one codebook per column segment (Gong 2014): row-major codes
        codes = a.reshape(n, kc)
        if torch.equal(c[torch.arange(kc), codes].reshape(n, -1), wf):
            return codes.contiguous(), c
    for codes in (a.reshape(n, kc), a.reshape(kc, n).t()):
        if torch.equal(c[codes].reshape(n, -1), wf):
            return codes.contiguous(), c
    raise ValueError(f"{name}: cannot map assignments to weight_from_codebook() (unknown order)")


def _pack_pq(m, name, bits, group_size, symmetric, backend, scale_dtype):
    codes, cents = pq_codes(m, name)
    return PackedLinear.from_codebook(codes, cents, getattr(m, "bias", None), backend)


# ------------------------------------------------------------------------------ RQ layers
def _pack_rq(m, name, bits, group_size, symmetric, backend, scale_dtype):
    packed = from_rq_module(m, getattr(m, "bias", None), backend)
    return PackedConv2d.wrap(packed, m) if isinstance(m, RQConv2d) else packed


# ------------------------------------------------------------------------------ fake-quant layers
def _pack_fake_quant(m, name, bits, group_size, symmetric, backend, scale_dtype):
    wq = m.weight_quantizer
    if wq is None or not getattr(wq, "enabled", True):
        return None
    packer = packer_for(wq)
    if isinstance(m, QuantEmbedding) and (packer is None or not packer.embeddings):
        return None  # other quantized embeddings stay fake-quant layers (not packed)
    if packer is None:
        raise ValueError(unpackable_message([(name, type(wq).__name__)]))
    packed = packer.pack(m, wq, name, getattr(m, "bias", None), backend, scale_dtype)
    if packed.fmt not in packer.formats:
        raise RuntimeError(f"{name}: the {packer.cls.__name__} packer wrote format "
                           f"{packed.fmt!r}; it is registered for {packer.formats}")
    packed.act_quantizer = m.act_quantizer
    return packed


def _pack_qparams(m, wq, name, bias, backend, scale_dtype):
    """The quantizer's own integer codes and scales (``export_qparams``): uniform QAT / PTQ,
    shift-scale, stochastic, LSQ (per tensor: the scale stored once per row)."""
    q = wq.export_qparams(m.weight)
    k = m.weight[0].numel()
    gran = q["granularity"]
    if gran == "channel" and getattr(wq, "axis", 0) != 0:
        raise ValueError(f"{name}: per-channel export needs axis=0, got {wq.axis}")
    g = q["group_size"] if gran == "group" else None
    return PackedLinear.from_qparams(q["codes"], q["scale"], q["zero_point"], q["bits"],
                                     q["symmetric"], g, k, bias, backend, scale_dtype)


def _pack_groupwise(m, wq, name, bias, backend, scale_dtype):
    """Q-BERT group-wise weights (Shen et al. 2019, sec. 3.2): every group is a block of whole
    output rows (embedding: whole table rows), so the uniform per-channel format holds it
    exactly, each row storing its group's scale (and zero-point): the forward's codes, one
    scale per row instead of per group (+ (rows - groups) scales in the file)."""
    w = m.weight.detach()
    qp, idx = wq.qparams(w)
    flat = w.reshape(w.shape[0], -1)
    rows = U.QParams(qp.scale[idx][:, None], qp.zero_point[idx][:, None], qp.qmin, qp.qmax)
    return PackedLinear.from_qparams(U.quantize(flat, rows), rows.scale, rows.zero_point,
                                     wq.bits, wq.symmetric, None, flat.shape[1], bias, backend,
                                     scale_dtype)


def _pack_pow2(m, wq, name, bias, backend, scale_dtype):
    """INQ power-of-two weights: ``bits`` bits per weight as bit planes + the int8 n1."""
    return PackedLinear.from_pow2(m.weight, wq.bits, bias, backend)


def _pack_quant_noise(m, wq, name, bias, backend, scale_dtype):
    """The fully quantized (p = 1) Quant-Noise weight: int modes as the uniform format with
    float32 scales -- per tensor affine (codes 0..2^N-1, uint8 zero-point), per channel
    symmetric -- exactly ``QuantNoiseQuantizer.quantized_value`` (a per-tensor scale and
    zero-point are repeated per row, as the format stores one per row); 'pq' / 'drop' as the
    codebook format (uint8 codes of the current weight's nearest codewords, float16
    centroids). Output-activation ranges (int modes) are not part of the packed layer."""
    q = wq.export_qparams(m.weight)
    if "centroids" in q:
        if q["centroids"].shape[0] > 256:
            raise ValueError(f"{name}: Quant-Noise pq with {q['centroids'].shape[0]} centroids; "
                             "the packed codebook format allows at most 256 (bits <= 8)")
        return PackedLinear.from_codebook(q["codes"], q["centroids"], bias, backend)
    return PackedLinear.from_qparams(q["codes"], q["scale"], q["zero_point"], q["bits"],
                                     q["symmetric"], None, q["codes"].shape[1], bias, backend,
                                     torch.float32)


# ------------------------------------------------------------------------------ plain layers
def _pack_plain(m, name, bits, group_size, symmetric, backend, scale_dtype):
    k = m.in_features
    g = group_size if group_size and k % group_size == 0 else None
    return PackedLinear.from_linear(m, bits, g, symmetric, backend, scale_dtype)


register_layer(LayerKind("pq", lambda m, bits: is_pq(m), _pack_pq, "PQ / iPQ"))
register_layer(LayerKind("rq", lambda m, bits: is_rq(m), _pack_rq, "residual quantization (VQ)"))
register_layer(LayerKind("fake_quant",
                         lambda m, bits: isinstance(m, QuantLinear | QuantConv2d | QuantEmbedding),
                         _pack_fake_quant))
register_layer(LayerKind("plain_linear", lambda m, bits: type(m) is nn.Linear and bits is not None,
                         _pack_plain))

register_packer(Packer(UniformQuantizer, _pack_qparams, ("uniform",),
                       "uniform (QAT/PTQ, shift-scale, stochastic)", subclasses=True))
register_packer(Packer(LSQQuantizer, _pack_qparams, ("uniform",), "LSQ", subclasses=True,
                       embeddings=False))
register_packer(Packer(GroupwiseQuantizer, _pack_groupwise, ("uniform",), "Q-BERT group-wise",
                       subclasses=True))
register_packer(Packer(PowerOfTwoQuantizer, _pack_pow2, ("pow2",), "power-of-two (INQ)",
                       subclasses=True, embeddings=False))
register_packer(Packer(QuantNoiseQuantizer, _pack_quant_noise, ("uniform", "codebook"),
                       "Quant-Noise", subclasses=True))
register_packer(Packer(object, _pack_qparams, ("uniform",), "any quantizer with export_qparams",
                       embeddings=False), protocol="export_qparams")
