"""Interop export: a packed qtrain model as an ONNX QDQ graph that onnxruntime runs without
qtrain.

The graph is the standard "QDQ" representation of a quantized network (ONNX operators
``QuantizeLinear`` / ``DequantizeLinear``, opset 21; the format onnxruntime, TensorRT and
OpenVINO read):

* weights of the packed ``uniform`` layers (:class:`qtrain.nn.packed.PackedLinear` /
  ``PackedConv2d`` / ``PackedEmbedding``: uniform QAT / PTQ / LSQ / Q-BERT group-wise /
  calibrated / Quant-Noise int weights, Jacob et al. 2018 eq. (1) ``r = S (q - Z)``) are
  stored as integer initializers -- INT8 / UINT8 for 5..8-bit codes, INT4 / UINT4 (two codes
  a byte) for 1..4-bit codes, signed for symmetric codes (no zero-point), unsigned with a
  zero-point of the same type for affine codes -- with their float32 scales, per output
  channel (``axis=0``) or per group of ``G`` consecutive inputs of a row (blocked
  quantization: ``axis=1, block_size=G`` on the ``(out, in)`` matrix; a convolution's weight
  is then reshaped to ``(out, in/groups, kh, kw)``), and a ``DequantizeLinear`` feeds the
  ``Conv`` / ``Gemm`` / ``MatMul`` / ``Gather``. ``DequantizeLinear`` computes
  ``(q - Z) * S`` in float32, exactly qtrain's ``(u - z) * s``: the weights onnxruntime
  uses are bit-identical to the packed model's.
* a layer's trained activation quantizer with a static range (``UniformQuantizer`` with the
  EMA observer, per tensor: the range frozen in eval mode; a frozen PTQ
  ``CalibratedQuantizer``: its calibrated scale and zero-point; PACT's learned clip level,
  LSQ's learned step, DoReFa's fixed [0, 1] grid: :func:`act_qparams`) becomes
  ``QuantizeLinear`` -> ``DequantizeLinear`` on the layer's input with that scale and
  zero-point (INT8 for signed, UINT8 for unsigned codes; fewer than 8 bits add a ``Clip``
  to the code range between them). ONNX ``QuantizeLinear`` rounds half to even, as
  ``torch.round``. PACT and LSQ compute ``round(x / S)`` as ONNX does: their Q/DQ equals
  the trained forward bit for bit (tested on every input value, ties included). The
  uniform quantizers round ``x * (1 / S)`` (PyTorch's fake-quant convention,
  :func:`qtrain.quant.uniform.quantize`) and DoReFa ``x (2^k - 1)``: one ulp apart now and
  then, which moves a value lying exactly on a rounding tie by one step -- the only source
  of difference besides float summation order.
* everything else (BatchNorm with its running statistics, float layers, pooling, residual
  adds, a transformer's attention and LayerNorm) is what ``torch.onnx.export`` writes for it.
* inputs: one tensor (``input``, batch axis dynamic), or a Hugging Face batch dict
  (``input_ids``, ``attention_mask``, ``token_type_ids``: inputs of those names, batch and
  sequence axes dynamic; the attention mask is applied to every input, padded or not).

What cannot be written this way -- any other packed format (PQ / codebook, lut, ternary,
binary, pow2, float, bucketed, value-aware, residual, sparse), non-integer zero-points,
dynamic or non-uniform activation quantizers, fake-quant layers left unpacked -- is named,
every layer at once, in one :class:`qtrain.errors.ConfigError` listing what is supported
(:func:`check_exportable`), before anything is exported -- and, with ``export_onnx=true``,
before training (:func:`preflight`: each quantized layer packed on its own right after the
quantization callbacks convert the model, in ``on_fit_start``).

How: the packed model is copied into a "twin" whose quantized layers compute the same
function through two ``torch.autograd.Function`` s with ONNX symbolics -- the activation
Q/DQ, and a placeholder for each quantized weight -- and exported with PyTorch's
TorchScript exporter (``dynamo=False``: it takes ~0.1 s where the torch.export-based one
took 10-30 s per model on the 2-core dev VM, and the placeholder keeps the exporter from
folding BatchNorm into a weight that must stay the trained integer codes). The placeholders
are then replaced by the integer initializers and ``DequantizeLinear`` nodes and the default
opset raised from 20 (the TorchScript exporter's highest) to 21 (INT4 / UINT4 and blocked
``DequantizeLinear``; opset 21 only widened the types of the other operators), and the model
passes ``onnx.checker`` with full shape inference. The file records the per-layer formats
and the run's recipe / method / bits as ``metadata_props`` (``qtrain.layers``,
``qtrain.run``).

Speed: the graph computes what the trained model computed -- quantized layer *inputs*, float
outputs -- so onnxruntime's CPU provider finds no DQ -> Conv -> Q group to run in integer
kernels, and by default keeps each weight's ``DequantizeLinear`` in the graph (which also
keeps it from pre-packing the weights and folding BatchNorm): measured ~1.9x (batch 64) and
6-20x (batch 1) slower than the fp32 ONNX of the same network on ResNet-20 (shared 2-core
VM); the session option ``session.disable_quant_qdq=1`` constant-folds the weights at load
and brings batch 64 to ~1.15x (``benchmarks/onnx_export.py``). The file is the interchange format (int8 / int4 storage,
exact weights); integer execution is up to the runtime.

CLI: ``python -m qtrain.export_onnx <run dir | model_packed.safetensors> --out model.onnx``
(the run's ``config_resolved.yaml`` gives the architecture, ``--input-shape 1,1,8,8`` the
example input when the run's data cannot be built in smoke mode); ``train.py ... export=true
export_onnx=true`` writes ``<run dir>/model.onnx`` and checks it against the packed model on
a test batch. Needs the ``onnx`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.atomic_file import write_atomic
from qtrain.errors import ConfigError, run_cli
from qtrain.export_check import unexportable_layers
from qtrain.export_load import load_packed, load_run
from qtrain.export_pack import pack_model
from qtrain.export_spec import run_info
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer
from qtrain.nn.learned_quantizers import _EPS, DoReFaActQuantizer, LSQQuantizer, PACTQuantizer
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.quantizer_base import Quantizer
from qtrain.nn.rq_layers import is_rq
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import uniform as U
from qtrain_kernels import layout as L

log = logging.getLogger("qtrain")

OPSET = 21
DOMAIN = "qtrain_export"  # the placeholders' domain (none is left in the written file)
SUPPORTED = ("packed 'uniform' weights with 1..8-bit codes and integer zero-points, per "
             "output channel or per group along the input (uniform QAT/PTQ, LSQ, Q-BERT "
             "group-wise, calibrated, Quant-Noise int8/int4); activation quantizers: "
             "UniformQuantizer per tensor with the EMA observer (static range), frozen "
             "CalibratedQuantizer (PTQ), PACTQuantizer, LSQQuantizer (signed or unsigned), "
             "DoReFaActQuantizer")


# ------------------------------------------------------------------------ what is exportable
def _weight_problem(m: PackedLinear) -> str | None:
    if m.fmt != "uniform":
        return f"packed format {m.fmt!r}"
    if not 1 <= int(m.bits) <= 8:
        return f"{m.bits}-bit codes"
    zeros = getattr(m, "zeros", None)
    if not m.symmetric and (zeros is None or zeros.dtype != torch.uint8):
        return "non-integer (float) zero-points"
    if isinstance(m, PackedEmbedding) and m.emb_args.get("max_norm") is not None:
        return "embedding with max_norm (renormalises its table at run time)"
    return None


def _act_problem(aq: nn.Module | None, final: bool = True) -> str | None:
    """Why the activation quantizer ``aq`` has no static Q/DQ form (None: it has one).
    ``final=False`` (the pre-training check, :func:`preflight`): its type and settings only --
    a range, step or clip level still to be learned / calibrated, and a quantizer switched
    off until ``start_epoch``, are not problems yet."""
    if aq is None or (final and not getattr(aq, "enabled", True)):
        return None
    t = type(aq)
    if t is CalibratedQuantizer:
        if final and (not bool(aq.frozen) or aq.scale.numel() != 1):
            return "activation quantizer CalibratedQuantizer not frozen (range not final)"
        return None
    if t is PACTQuantizer:
        if final and not bool(torch.isfinite(aq.alpha)):
            return "activation quantizer PACTQuantizer never calibrated (alpha is NaN)"
        return None
    if t is LSQQuantizer:
        if final and not bool(aq.initialized):
            return "activation quantizer LSQQuantizer never saw data (no step)"
        return None
    if t is DoReFaActQuantizer:
        return None
    if t is not UniformQuantizer:
        return f"activation quantizer {t.__name__}"
    if aq.granularity != "tensor" or aq.observer != "ema":
        return (f"activation quantizer UniformQuantizer(granularity={aq.granularity!r}, "
                f"observer={aq.observer!r}) without a static per-tensor range")
    if final and not bool(aq.initialized):
        return "activation quantizer never saw data (no range)"
    return None


def check_exportable(model: nn.Module) -> None:
    """Raise one :class:`ConfigError` naming every layer of ``model`` (a packed model,
    :func:`qtrain.export.pack_model` / ``load_run``) that has no ONNX QDQ form, and what is
    supported."""
    _raise(unexportable_layers(model, lambda m: _weight_problem(m) or _act_problem(m.act_quantizer)))


def _raise(bad: list[str], before: str = "ONNX export", after: str = "") -> None:
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ConfigError(f"{before}: {len(bad)} layer(s) have no ONNX QDQ form: "
                          f"{'; '.join(bad[:8])}{more}. Supported: {SUPPORTED}{after}")


def _is_layer(m: nn.Module) -> bool:
    """What :func:`qtrain.export.pack_model` packs: fake-quant layers (a ``weight_quantizer``),
    PQ layers (``centroids`` + ``assignments``), residual-quantized layers."""
    return (hasattr(m, "weight_quantizer") or is_rq(m)
            or all(hasattr(m, a) for a in ("centroids", "assignments", "block_size")))


@torch.no_grad()
def preflight(model: nn.Module) -> None:
    """``export_onnx=true``, before the first training step (the quantization callbacks have
    converted the layers in ``setup``; :class:`qtrain.callbacks.onnx_preflight.OnnxPreflight`):
    each quantized layer of the fake-quant ``model`` is packed on its own (a copy, every
    quantizer switched on: a method that starts quantizing after ``start_epoch`` has them
    off now) with :func:`qtrain.export.pack_model` -- so the packed format is the one the
    end of the run will write, not a second list of rules -- and checked as
    :func:`check_exportable` will check the packed model after training, settings only
    (ranges / steps / clip levels are learned or calibrated later). One
    :class:`ConfigError` names every layer the ONNX export cannot represent and what it
    supports. A layer that cannot be packed before training (state the method builds
    during the run) is left to the check after training (logged)."""
    bad, seen = [], set()
    for name, m in model.named_modules():
        if id(m) in seen or not _is_layer(m):
            continue
        seen.update(id(q) for q in m.modules())
        c = copy.deepcopy(m)
        for q in c.modules():
            if isinstance(q, Quantizer):
                q.enabled = True
        try:
            p = pack_model(nn.ModuleDict({"layer": c}), backend="torch")["layer"]
        except Exception as e:  # noqa: BLE001 - decided after training instead
            log.info("ONNX preflight: layer %s not packable before training (%s: %s); "
                     "checked after training", name, type(e).__name__, e)
            continue
        if isinstance(p, PackedLinear):
            act = set() if p.act_quantizer is None else {id(q) for q in p.act_quantizer.modules()}
            other = [type(q).__name__ for q in p.modules()
                     if isinstance(q, Quantizer) and id(q) not in act]
            why = (_weight_problem(p) or _act_problem(p.act_quantizer, final=False)
                   or (f"{other[0]} besides the input quantizer" if other else None))
        elif all(hasattr(p, a) for a in ("centroids", "assignments")):
            why = f"PQ layer {type(p).__name__}, not packed"
        else:  # e.g. an embedding with a non-uniform quantizer stays a fake-quant layer
            wq = getattr(p, "weight_quantizer", None)
            if wq is not None:
                why = f"{type(p).__name__} with {type(wq).__name__} is not packed"
            elif any(isinstance(q, Quantizer) for q in p.modules()):
                why = f"{type(p).__name__} with quantizers but no weight quantizer: not packed"
            else:
                why = None
        if why:
            bad.append(f"{name} ({why})")
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and id(m) not in seen:
            bad.append(f"{name} ({type(m).__name__} outside a quantized layer)")
    _raise(bad, "export_onnx=true", " -- run without export_onnx=true (the packed export "
           "alone, export=true, has more formats)")


# ------------------------------------------------------------------------ per-layer data
def weight_codes(m: PackedLinear) -> dict:
    """The integer weight of a packed ``uniform`` layer as ONNX stores it: ``codes`` (out,
    in) int64 (signed if symmetric), ``scale`` (out, groups) float32, ``zero_point`` (out,
    groups) int64 or None, ``onnx_type`` (INT8 / UINT8 / INT4 / UINT4), ``group_size`` (None:
    per output channel)."""
    import onnx

    T = onnx.TensorProto
    u = L.unpack_codes(m.packed, L.container_bits(m.bits), m.in_features)
    narrow = m.bits <= 4
    if m.symmetric:
        codes, zp = u - 2 ** (m.bits - 1), None
        t = T.INT4 if narrow else T.INT8
    else:
        codes, zp = u, m.zeros.to(torch.int64)
        t = T.UINT4 if narrow else T.UINT8
    lo, hi = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT4: (-8, 7), T.UINT4: (0, 15)}[t]
    for what, v in (("codes", codes), ("zero-points", zp)):
        if v is not None and v.numel() and not (lo <= int(v.min()) and int(v.max()) <= hi):
            raise ConfigError(f"ONNX export: {what} of a {m.bits}-bit layer outside "
                              f"[{lo}, {hi}] ({T.DataType.Name(t)})")
    ng = m.scales.shape[1]
    return {"codes": codes, "scale": m.scales.float(), "zero_point": zp, "onnx_type": t,
            "group_size": None if ng == 1 else m.in_features // ng}


def act_qparams(aq: nn.Module) -> tuple[float, int, int, int]:
    """(scale, zero_point, q_min, q_max) of a static per-tensor activation quantizer: its
    eval-mode forward is ``(clamp(round(x / scale) + zero_point, q_min, q_max) - zero_point)
    * scale`` -- ONNX ``QuantizeLinear`` (``saturate(round(x / y_scale) + y_zero_point)``,
    round half to even, as ``torch.round``) -> ``Clip`` to the code range -> ``DequantizeLinear``.

    * ``UniformQuantizer`` (EMA observer): :meth:`UniformQuantizer.qparams` with the frozen
      range; a frozen ``CalibratedQuantizer``: its stored scale and zero-point.
    * ``PACTQuantizer`` (Choi et al. 2018, eqs. (1)-(2)): ``y = clip(x, 0, alpha)``,
      ``round(y / S) * S`` with ``S = alpha / (2^k - 1)`` (float32, as the forward computes
      it). Clipping to [0, alpha] first and clipping the code to [0, 2^k - 1] after rounding
      agree: a code outside is ``round(x / S)`` of an ``x`` outside [0, alpha], and
      ``round(alpha / S) = 2^k - 1`` (``alpha / S`` lies within a few ulps of the integer
      2^k - 1), ``round(0 / S) = 0``. So PACT is ``QuantizeLinear(S, 0)`` into UINT8 ->
      ``Clip(0, 2^k - 1)`` (none at 8 bits) -> ``DequantizeLinear(S, 0)``, the same float32
      division, the same rounding, bit for bit.
    * ``LSQQuantizer`` (Esser et al. 2020, eqs. (1)-(2)): ``round(clamp(x / s, -Qn, Qp)) s``;
      clamping before or after rounding agree (integer bounds), so it is ``QuantizeLinear(s,
      0)`` into INT8 (signed: Qn = 2^(b-1), Qp = 2^(b-1) - 1, the INT8 range at 8 bits) or
      UINT8 (unsigned: 0..2^b - 1) -> ``Clip(-Qn, Qp)`` below 8 bits -> ``DequantizeLinear``,
      bit for bit (``s`` clamped to >= 1e-8 as the forward does).
    * ``DoReFaActQuantizer`` (Zhou et al. 2016, eq. (11)): ``round(clip(x, 0, 1) (2^k - 1)) /
      (2^k - 1)`` -> scale ``float32(1 / (2^k - 1))``, UINT8, Clip(0, 2^k - 1). Not bit for
      bit: DoReFa multiplies by 2^k - 1 and divides the code by it, ONNX divides by and
      multiplies with the float32 reciprocal -- one ulp of the output now and then, and a
      value exactly on a rounding tie may move one step."""
    if isinstance(aq, PACTQuantizer):
        n = 2**aq.bits - 1
        s = aq.alpha.detach().float().clamp_min(_EPS) / float(n)  # _PACTFn's float32 ops
        return float(s), 0, 0, n
    if isinstance(aq, LSQQuantizer):
        qn, qp = aq.qn_qp
        return float(aq.step.detach().float().clamp_min(_EPS)), 0, -qn, qp
    if isinstance(aq, DoReFaActQuantizer):
        n = 2**aq.bits - 1
        return float(torch.tensor(1.0 / n, dtype=torch.float32)), 0, 0, n
    if isinstance(aq, CalibratedQuantizer):
        qp = aq.qparams()
    else:
        qp = U.qparams_from_range(aq.running_min, aq.running_max, aq.bits, aq.symmetric)
    return float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax


# ------------------------------------------------------------------------ the export twin
class _ActQDQ(torch.autograd.Function):
    """qtrain's per-tensor fake quantization (eager) / ONNX QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale: float, zp: int, qmin: int, qmax: int):
        qp = U.QParams(torch.tensor(scale, dtype=torch.float32),
                       torch.tensor(float(zp)), qmin, qmax)
        return U.fake_quantize(x, qp)

    @staticmethod
    def symbolic(g, x, scale: float, zp: int, qmin: int, qmax: int):
        dt = torch.int8 if qmin < 0 else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zp, dtype=dt))
        q = g.op("QuantizeLinear", x, s, z)
        full = (-128, 127) if qmin < 0 else (0, 255)
        if (qmin, qmax) != full:  # fewer than 8 bits: the code range of the trained quantizer
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dt)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dt)))
        return g.op("DequantizeLinear", q, s, z)


class _QWeight(torch.autograd.Function):
    """The dequantized weight (eager) / a placeholder node replaced after export by the
    integer initializer and its DequantizeLinear (:func:`_insert_weights`)."""

    @staticmethod
    def forward(ctx, w, name: str):
        return w.clone()

    @staticmethod
    def symbolic(g, w, name: str):
        out = g.op(f"{DOMAIN}::QWeight", w, name_s=name)
        out.setType(w.type())
        return out


class _Twin(nn.Module):
    """A packed layer as the exporter sees it: the dequantized float32 weight (bit-identical
    to ``PackedLinear.dequantize()``), its bias, conv / embedding arguments and act Q/DQ."""

    def __init__(self, name: str, m: PackedLinear, quantized: bool) -> None:
        super().__init__()
        self.name, self.quantized = name, quantized
        w = m.dequantize().float()
        if isinstance(m, PackedConv2d):
            self.kind, self.args = "conv", m.conv_args
            w = w.reshape(m.conv_args["weight_shape"])
        elif isinstance(m, PackedEmbedding):
            self.kind, self.args = "embedding", m.emb_args
        else:
            self.kind, self.args = "linear", {}
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float())
        aq = m.act_quantizer
        self.act = act_qparams(aq) if aq is not None and getattr(aq, "enabled", True) else None

    def forward(self, x):
        w = self.weight
        if self.quantized:
            if self.act is not None:
                x = _ActQDQ.apply(x, *self.act)
            w = _QWeight.apply(w, self.name)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        if self.kind == "embedding":
            return F.embedding(x, w, self.args["padding_idx"])
        a = self.args
        pad = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return F.conv2d(x, w, self.bias, tuple(a["stride"]), pad, tuple(a["dilation"]),
                        a["groups"])


def twin(model: nn.Module, quantized: bool = True) -> tuple[nn.Module, dict[str, dict]]:
    """(exportable copy of the packed ``model``, {layer name: :func:`weight_codes`}).
    ``quantized=False``: the same network in float32 (dequantized weights, no activation
    quantization): the fp32 ONNX baseline."""
    out = copy.deepcopy(model).eval()
    layers = {}
    for name, m in list(out.named_modules()):
        if not isinstance(m, PackedLinear):
            continue
        if name == "":
            raise ConfigError("ONNX export: the model itself is a single packed layer; wrap it")
        layers[name] = {**weight_codes(m), "kind": None}
        t = _Twin(name, m, quantized)
        layers[name]["kind"] = t.kind
        layers[name]["weight_shape"] = list(t.weight.shape)
        parent = out.get_submodule(name.rpartition(".")[0]) if "." in name else out
        setattr(parent, name.rpartition(".")[2], t)
    return out, layers


# ------------------------------------------------------------------------ graph surgery
def _int_tensor(name: str, values: torch.Tensor, onnx_type: int, dims: list[int]):
    """An ONNX initializer of integer codes as raw bytes: INT8 / UINT8 one a byte, INT4 /
    UINT4 two a byte (first element in the low nibble, as the ONNX spec packs them)."""
    import onnx

    v = values.reshape(-1).to(torch.int64)
    if onnx_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        dt = torch.int8 if onnx_type == onnx.TensorProto.INT8 else torch.uint8
        raw = v.to(dt).numpy().tobytes()
    else:
        nib = (v & 0xF).to(torch.uint8)
        if nib.numel() % 2:
            nib = torch.cat([nib, nib.new_zeros(1)])
        raw = (nib[0::2] | (nib[1::2] << 4)).numpy().tobytes()
    return onnx.helper.make_tensor(name, onnx_type, dims, raw, raw=True)


def _insert_weights(model, layers: dict) -> None:
    """Replace every QWeight placeholder by integer initializers + DequantizeLinear (+ Reshape
    of a grouped convolution weight) and drop the float weight it carried."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    nodes = list(g.node)
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes, drop, rename = [], set(), {}
    for n in nodes:
        if n.domain != DOMAIN:
            new_nodes.append(n)
            continue
        name = next(a.s.decode() for a in n.attribute if a.name == "name")
        spec = layers[name]
        codes, t, grp = spec["codes"], spec["onnx_type"], spec["group_size"]
        shape = spec["weight_shape"]
        base = f"{name}.weight"
        if grp is None:  # per output channel: the weight's own shape, axis 0
            dims, sdims, attrs = shape, [shape[0]], {"axis": 0}
        else:  # blocked along the flattened input of each row
            dims, sdims = list(codes.shape), list(spec["scale"].shape)
            attrs = {"axis": 1, "block_size": grp}
        g.initializer.append(_int_tensor(f"{base}_quantized", codes, t, dims))
        g.initializer.append(numpy_helper.from_array(
            spec["scale"].reshape(sdims).numpy(), f"{base}_scale"))
        ins = [f"{base}_quantized", f"{base}_scale"]
        if spec["zero_point"] is not None:
            g.initializer.append(_int_tensor(f"{base}_zero_point", spec["zero_point"], t, sdims))
            ins.append(f"{base}_zero_point")
        out = rename[n.output[0]] = f"{base}_dequantized"
        dq_out = out
        if grp is not None and len(shape) != 2:
            dq_out = f"{base}_dequantized_2d"
            g.initializer.append(numpy_helper.from_array(
                torch.tensor(shape, dtype=torch.int64).numpy(), f"{base}_shape"))
        new_nodes.append(helper.make_node("DequantizeLinear", ins, [dq_out],
                                          name=f"{base}_DequantizeLinear", **attrs))
        if dq_out != out:
            new_nodes.append(helper.make_node("Reshape", [dq_out, f"{base}_shape"], [out],
                                              name=f"{base}_Reshape"))
        if uses.get(n.input[0]) == 1:
            drop.add(n.input[0])
    missing = set(layers) - {next(a.s.decode() for a in n.attribute if a.name == "name")
                             for n in nodes if n.domain == DOMAIN}
    if missing:
        raise RuntimeError(f"ONNX export: layers {sorted(missing)} were not traced (not on "
                           "the forward path of the example input)")
    for n in new_nodes:  # consumers of a placeholder read the dequantized weight
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    ops = [o for o in model.opset_import if o.domain not in ("", DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET), *ops])
    model.ir_version = max(model.ir_version, onnx.IR_VERSION_2024_3_25)  # IR 10: INT4


def _layer_meta(layers: dict) -> dict:
    import onnx

    return {n: {"kind": s["kind"], "onnx_type": onnx.TensorProto.DataType.Name(s["onnx_type"]),
                "granularity": "channel" if s["group_size"] is None else "group",
                "group_size": s["group_size"], "zero_point": s["zero_point"] is not None}
            for n, s in layers.items()}


class _DictInputs(nn.Module):
    """``net(batch dict)`` (a Hugging Face model, :class:`qtrain.models.hf.HFSequenceClassifier`)
    as a module of positional tensors: the exporter passes a trailing dict as keyword
    arguments, and ONNX graphs take named tensors."""

    def __init__(self, net: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.net, self.keys = net, keys

    def forward(self, *xs):
        return self.net(dict(zip(self.keys, xs, strict=True)))


def _inputs(example) -> dict[str, torch.Tensor]:
    """{ONNX input name: tensor}: ``input`` for one tensor, the dict's own keys for a batch
    dict (token ids, attention mask, ...)."""
    if isinstance(example, torch.Tensor):
        return {"input": example}
    if isinstance(example, Mapping) and example and all(
            isinstance(v, torch.Tensor) for v in example.values()):
        return dict(example)
    raise ConfigError(f"ONNX export: example input of type {type(example).__name__}; "
                      "expected a tensor or a dict of tensors (token ids, attention mask)")


def to_onnx(model: nn.Module, example: torch.Tensor | dict[str, torch.Tensor],
            quantized: bool = True, run: dict | None = None, dynamic_batch: bool = True):
    """The ONNX ModelProto of a packed ``model`` (module doc) traced with ``example``;
    ``quantized=False``: the fp32 baseline of the same network.

    ``example`` a dict of tensors (a Hugging Face batch: ``input_ids``, ``attention_mask``,
    ``token_type_ids``): the graph takes them as inputs of those names, batch and sequence
    axes dynamic. (transformers >= 5 builds the attention mask without its all-ones
    shortcut while tracing, so a graph traced on an unpadded example still applies the
    mask of padded inputs; tests/test_export_onnx.py checks it.)"""
    import onnx

    from qtrain import optional

    optional.require("onnx", "ONNX export (qtrain.export_onnx)")
    if quantized:
        check_exportable(model)
    inputs = _inputs(example)
    net, layers = twin(model, quantized)
    axes = {"output": {0: "batch"}}
    if isinstance(example, Mapping):
        net = _DictInputs(net, list(inputs))
        axes.update({k: {0: "batch", 1: "sequence"} if v.dim() > 1 else {0: "batch"}
                     for k, v in inputs.items()})
    else:
        axes["input"] = {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(net, tuple(inputs.values()), buf, dynamo=False,
                          opset_version=OPSET - 1, input_names=list(inputs),
                          output_names=["output"], dynamic_axes=axes if dynamic_batch else None,
                          custom_opsets={DOMAIN: 1} if quantized else None,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if quantized:
        _insert_weights(proto, layers)
        meta = {"qtrain.layers": json.dumps(_layer_meta(layers), sort_keys=True),
                "qtrain.run": json.dumps(run or {}, sort_keys=True)}
        onnx.helper.set_model_props(proto, meta)
    else:
        proto.opset_import[0].version = OPSET
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(model: nn.Module, example: torch.Tensor | dict[str, torch.Tensor], path: str | os.PathLike,
              quantized: bool = True, run: dict | None = None) -> dict:
    """Write :func:`to_onnx` to ``path`` (atomically); returns {"path", "file_bytes",
    "n_quantized_layers"}."""
    proto = to_onnx(model, example, quantized, run)
    write_atomic(proto.SerializeToString(), path)
    n = sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear"
            and n.input[0].endswith(".weight_quantized"))
    return {"path": str(path), "file_bytes": os.path.getsize(path), "n_quantized_layers": n}


def run_onnx(path: str | os.PathLike, x: torch.Tensor | dict[str, torch.Tensor],
             threads: int = 1) -> torch.Tensor:
    """Outputs of the ONNX file at ``path`` on ``x`` (a tensor, or the batch dict the
    model was exported with) with onnxruntime's CPU provider."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}  # inputs the model never read are not in it
    feed = {k: v.detach().cpu().numpy() for k, v in _inputs(x).items() if k in names}
    return torch.from_numpy(sess.run(None, feed)[0])


def export_run(run_dir: str, dm, module, run: dict | None = None,
               name: str = "model.onnx") -> dict:
    """``train.py ... export=true export_onnx=true``: the run's packed file (just written)
    loaded back (:func:`qtrain.export.load_run`), exported to ``<run dir>/model.onnx`` with
    the first test batch as the example input, and run by onnxruntime on that batch: the
    largest absolute difference from the packed model's outputs goes into the summary."""
    dm.setup("test")
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    x = _inputs(module.split_batch(batch)[0])  # a tensor, or a batch dict (HF models)
    x = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
         for k, v in x.items()}
    model = load_packed(os.path.join(run_dir, "model_packed.safetensors"),
                        copy.deepcopy(module.model).cpu(), backend="torch").eval()
    path = os.path.join(run_dir, name)
    x = x["input"] if list(x) == ["input"] else x
    info = save_onnx(model, x[:1] if isinstance(x, torch.Tensor) else x, path, run=run)
    with torch.no_grad():
        ref = model(x)
    diff = float((run_onnx(path, x) - ref).abs().max())
    return {"onnx_file": path, "onnx_mb": info["file_bytes"] / 1e6,
            "onnx_max_abs_diff": diff}


# ------------------------------------------------------------------------ CLI
def _example_from_run(cfg, shape: str | None) -> torch.Tensor:
    """One input of the run's data (its smoke-mode copy: no real data needed), or zeros of
    ``shape`` ("1,1,8,8")."""
    if shape:
        try:
            dims = [int(d) for d in shape.split(",")]
        except ValueError:
            raise ConfigError(f"--input-shape={shape!r}; expected integers like 1,1,8,8") from None
        return torch.zeros(dims)
    import tempfile

    from hydra.utils import instantiate
    from omegaconf import open_dict

    with tempfile.TemporaryDirectory() as root:
        data = copy.deepcopy(cfg.data)
        with open_dict(data):
            data.fake, data.root = True, root
        try:
            dm = instantiate(data)
            dm.prepare_data()
            dm.setup("test")
            batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
        except Exception as e:  # noqa: BLE001 - any data module: one clear message
            raise ConfigError(f"cannot build an example input from the run's data config "
                              f"({type(e).__name__}: {e}); pass --input-shape, e.g. "
                              "1,1,8,8") from None
    x = batch[0] if isinstance(batch, list | tuple) else batch
    if isinstance(x, Mapping):  # a Hugging Face batch: the model's inputs without the labels
        return {k: v for k, v in x.items() if k != "labels"}
    if not isinstance(x, torch.Tensor):
        raise ConfigError("the run's batches are not (input tensor, target); pass --input-shape")
    return x[:1].float()


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    p = argparse.ArgumentParser(prog="python -m qtrain.export_onnx", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("source", help="run directory of `train.py ... export=true`, or its "
                   "model_packed.safetensors")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--input-shape", default=None,
                   help="example input shape, e.g. 1,1,8,8 (default: a smoke batch of the "
                   "run's data config)")
    p.add_argument("--fp32-out", default=None,
                   help="also write the same network in float32 (dequantized weights, no "
                   "activation quantization) here")
    a = p.parse_args(argv)
    run_dir = a.source if os.path.isdir(a.source) else os.path.dirname(a.source) or "."
    if not os.path.isdir(a.source) and os.path.basename(a.source) != "model_packed.safetensors":
        raise ConfigError(f"source={a.source!r}: pass a run directory or its "
                          "model_packed.safetensors")
    model = load_run(run_dir, backend="torch")
    cfg = OmegaConf.load(os.path.join(run_dir, "config_resolved.yaml"))
    x = _example_from_run(cfg, a.input_shape)
    info = save_onnx(model, x, a.out, run=run_info(cfg))
    with torch.no_grad():
        ref = model(x)
    info["max_abs_diff"] = float((run_onnx(a.out, x) - ref).abs().max())
    if a.fp32_out:
        info["fp32"] = save_onnx(model, x, a.fp32_out, quantized=False)
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    run_cli(main)
