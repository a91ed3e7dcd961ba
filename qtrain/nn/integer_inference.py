"""Integer-only inference of a QAT model (Jacob et al. 2018, sec. 2).

:func:`to_integer_model` turns a trained fake-quant model (BN folded,
:mod:`qtrain.nn.bn_fold`; residual blocks with their quantization points,
:mod:`qtrain.nn.quant_residual`) into :class:`IntegerModel`, whose layers compute with integer
tensors only:

* activations are uint8 codes q with a per-tensor (S, Z) from the trained EMA ranges
  (eq. 1, r = S (q - Z); sec. 3.1, zero exactly representable);
* weights are the codes of the folded weight: uint8 with a zero point, per tensor (the
  paper's scheme, default) or int8 symmetric (Z = 0; per channel allowed), held as
  ``torch.uint8`` / ``torch.int8`` tensors;
* biases are int32 with scale S_in S_w and zero point 0 (sec. 2.4);
* the conv / matmul accumulates sum (q_in - Z_in)(q_w - Z_w) + q_bias in int64 tensors and
  must fit int32 (eq. 4 / 7; eq. 7 only rearranges the same sum for speed, the result is
  identical) -- computed by float64 BLAS, exact because every partial sum is an integer below
  2^53 (checked per call; otherwise, or with ``fast_dot=False``, the int64 im2col reference);
* the accumulator is rescaled by M = S_in S_w / S_out = M0 2^-31 2^-n (eq. 5-6) with
  gemmlowp's rounding (:mod:`qtrain.quant.requantize`), plus Z_out, and clamped to the
  output code range; a following ReLU (ReLU6) is fused as clamping to [Z_out, 255]
  (sec. 2.4) ([Z_out, min(255, Z_out + round(6 / S_out))]).
* residual add (sec. 2.4: "addition ... requires rescaling the two inputs to a common
  scale"): :class:`IntegerAdd` follows the authors' TensorFlow Lite quantized ADD: both
  inputs (q - Z) are left-shifted by 20 bits, each rescaled by its own fixed-point multiplier
  S_i / (2 max(S_1, S_2)) (< 1), summed in int32, rescaled by 2 max(S_1, S_2) / (2^20 S_out)
  and offset by Z_out, ReLU fused as clamping.
* option-A shortcuts subsample the codes and pad new channels with the input's zero point
  (the code of 0.0); global average pooling before the classifier is summed inside the
  classifier's int32 accumulator, 1 / (H W) going into its multiplier (:class:`IntegerLayer`).

Boundaries (stated departures from "integer only"): the network input is quantized from float
with the first layer's input quantizer, and the final layer's int32 accumulator is
dequantized to float logits (S_in S_w acc; the paper's final layer would requantize to uint8 as
well -- argmax is the same up to the rounding of that step).

Every quantized tensor is named after the fake-quant quantizer that produces it in the float
model, so :meth:`IntegerModel.forward` can record each tensor's codes and, for per-layer
checks, take any of them from the fake-quant model (``forced``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear, is_fake_quant
from qtrain.nn.quant_residual import QuantBasicBlock
from qtrain.nn.quantizer_base import Quantizer
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import requantize as R
from qtrain.quant import uniform as U

ADD_LEFT_SHIFT = 20  # TFLite's quantized ADD


@dataclass(frozen=True)
class ActQParams:
    """Per-tensor affine parameters of an activation: r = scale (q - zero_point)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qp = U.QParams(torch.tensor(self.scale), torch.tensor(float(self.zero_point)),
                       self.qmin, self.qmax)
        return U.quantize(x.float(), qp).to(torch.int64)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return self.scale * (q.to(torch.float64) - self.zero_point)


def act_qparams(q: nn.Module, name: str) -> ActQParams:
    """(S, Z) of a trained activation quantizer (EMA range, per tensor); ConfigError naming
    the quantizer otherwise."""
    if not isinstance(q, UniformQuantizer) or q.observer != "ema" or q.granularity != "tensor":
        raise ConfigError(f"integer inference: activation quantizer {name} is "
                          f"{type(q).__name__}({getattr(q, 'observer', '?')}); allowed: "
                          "UniformQuantizer with observer='ema', granularity='tensor'")
    if not bool(q.initialized):
        raise ConfigError(f"integer inference: activation quantizer {name} has seen no data "
                          "(its EMA range is unset); train or calibrate first")
    qp = U.qparams_from_range(q.running_min, q.running_max, q.bits, q.symmetric)
    return ActQParams(float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)


class IntegerLayer(nn.Module):
    """Integer conv / linear: codes in -> int32 accumulate -> requantize (or float logits).

    ``pool``: the input is (N, C, H, W) codes whose global average pool feeds this linear
    layer; the H W sum is taken inside the int32 accumulator and 1 / (H W) goes into the
    multiplier (and the bias scale): no rounding of the pooled tensor (a departure from
    TFLite's separate uint8 AVERAGE_POOL, more exact). The constants (int32 bias, M0, n)
    depend on H W and are derived once per input geometry."""

    def __init__(self, name: str, layer: nn.Module, in_q: ActQParams, out_q: ActQParams | None,
                 act: str | None, pool: bool = False):
        super().__init__()
        self.name = name
        wq = layer.weight_quantizer
        if not isinstance(wq, UniformQuantizer) or wq.granularity not in ("tensor", "channel") \
                or (wq.granularity == "channel" and wq.axis != 0):
            raise ConfigError(f"integer inference: layer {name} weight quantizer "
                              f"{type(wq).__name__}; allowed: UniformQuantizer with granularity "
                              "'tensor' or 'channel' (axis 0)")
        if not wq.enabled:
            raise ConfigError(f"integer inference: layer {name} has its weight quantizer disabled")
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv and (layer.groups != 1 or tuple(layer.dilation) != (1, 1)
                             or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ConfigError(f"integer inference: conv {name} needs groups=1, dilation=1 and "
                              "numeric zero padding")
        with torch.no_grad():
            fold = hasattr(layer, "folded_weight")
            w = layer.folded_weight() if fold else layer.weight
            b = layer.folded_bias() if fold else layer.bias
            e = wq.export_qparams(w.detach())
        cout = w.shape[0]
        w_scale = e["scale"].detach().double().flatten()
        w_scale = w_scale.expand(cout).clone() if w_scale.numel() == 1 else w_scale
        w_zero = e["zero_point"].flatten().to(torch.int64)
        w_zero = w_zero.expand(cout).clone() if w_zero.numel() == 1 else w_zero
        dtype = torch.int8 if e["symmetric"] else torch.uint8
        self.register_buffer("w_codes", e["codes"].to(dtype))
        self.register_buffer("w_zero", w_zero)
        self.register_buffer("acc_scale", in_q.scale * w_scale)  # S_in S_w per output channel
        self.register_buffer("bias_f", torch.zeros(cout, dtype=torch.float64) if b is None
                             else b.detach().double())
        self.in_q, self.out_q, self.act, self.pool = in_q, out_q, act, pool
        self.fast_dot = True  # float64 BLAS for the integer dot products (exact; see _dot_float64)
        if out_q is not None:
            lo, hi = out_q.qmin, out_q.qmax
            if act in ("relu", "relu6"):
                lo = out_q.zero_point
            if act == "relu6":
                hi = min(hi, out_q.zero_point + round(6.0 / out_q.scale))
            self.clamp = (lo, hi)
        if self.is_conv:
            self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
            self.kernel_size = tuple(layer.kernel_size)
        self._consts: dict[int, tuple] = {}
        self.constants(1)  # validates the bias / multiplier now

    def constants(self, hw: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(int32 bias at scale S_in S_w / hw, M0, n) for M = S_in S_w / (hw S_out)."""
        if hw not in self._consts:
            scale = self.acc_scale / hw
            q_bias = torch.round(self.bias_f / scale)
            if bool((q_bias.abs() > R.INT32_MAX).any()):
                raise ConfigError(f"integer inference: layer {self.name} bias does not fit int32 "
                                  "at scale S_in S_w")
            m0 = n = None
            if self.out_q is not None:
                m0, n = R.quantize_multiplier_tensor(scale / self.out_q.scale)
            self._consts[hw] = (q_bias.to(torch.int32), m0, n)
        return self._consts[hw]

    def accumulate(self, q: torch.Tensor) -> tuple[torch.Tensor, int]:
        """int32 accumulator (int64 tensor) of eq. 4: sum (q_in - Z_in)(q_w - Z_w) + q_bias,
        and the pooled count hw (1 without pooling)."""
        x = q.to(torch.int64) - self.in_q.zero_point
        w = self.w_codes.to(torch.int64) - self.w_zero.reshape((-1,) + (1,) * (self.w_codes.dim() - 1))
        hw = 1
        if self.pool:
            hw = x.shape[2] * x.shape[3]
            x = x.sum((2, 3))
        q_bias = self.constants(hw)[0].to(torch.int64)
        k = w[0].numel()  # terms per output
        exact = k * int(x.abs().max()) * int(w.abs().max()) < 2 ** 53
        dot = self._dot_float64 if exact and self.fast_dot else self._dot_int64
        acc = dot(x, w)
        acc = acc + (q_bias.reshape(1, -1, 1, 1) if self.is_conv else q_bias)
        return R.check_int32(acc, f"integer layer {self.name}"), hw

    # Two ways to the same integer dot products (``fast_dot`` picks): float64 BLAS is exact
    # here -- every product and partial sum is an integer of magnitude <= k max|x| max|w|
    # < 2^53, which float64 represents exactly in any summation order -- and faster on CPU
    # than int64 matmul, which has no BLAS: a whole ResNet-20 integer forward of 128 CIFAR
    # images 3.5 s vs 12.6 s CPU (1 thread; the rest is requantization). The int64 im2col
    # path is the reference.
    def _dot_float64(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_conv:  # zero padding = code Z_in - Z_in: the real zero the float conv pads
            y = F.conv2d(x.double(), w.double(), stride=self.stride, padding=self.padding)
        else:
            y = x.double() @ w.double().t()
        return y.round().to(torch.int64)

    def _dot_int64(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return x @ w.t()
        (ph, pw), (sh, sw), (kh, kw) = self.padding, self.stride, self.kernel_size
        x = F.pad(x, (pw, pw, ph, ph))  # 0 = code Z_in - Z_in: the real zero the float conv pads
        n, c = x.shape[:2]
        cols = x.unfold(2, kh, sh).unfold(3, kw, sw)  # N, C, OH, OW, kh, kw
        oh, ow = cols.shape[2:4]
        cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        acc = cols @ w.reshape(w.shape[0], -1).t()
        return acc.reshape(n, oh, ow, -1).permute(0, 3, 1, 2)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc, hw = self.accumulate(q)
        shape = [1] * acc.dim()
        shape[1] = -1
        if self.out_q is None:  # the network output: dequantize the accumulator
            return (acc.double() * (self.acc_scale / hw).reshape(shape)).float()
        _, m0, n = self.constants(hw)
        return R.requantize(acc, m0.reshape(shape), n.reshape(shape), self.out_q.zero_point,
                            *self.clamp)


class IntegerAdd(nn.Module):
    """Quantized add of two uint8 tensors with a fused ReLU (module docstring, TFLite ADD)."""

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams, relu: bool):
        super().__init__()
        self.a, self.b, self.out = a, b, out
        twice_max = 2 * max(a.scale, b.scale)
        self.ma = R.quantize_multiplier(a.scale / twice_max)
        self.mb = R.quantize_multiplier(b.scale / twice_max)
        self.mo = R.quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * out.scale))
        self.clamp = (out.zero_point if relu else out.qmin, out.qmax)

    def forward(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        xa = (qa.to(torch.int64) - self.a.zero_point) << ADD_LEFT_SHIFT
        xb = (qb.to(torch.int64) - self.b.zero_point) << ADD_LEFT_SHIFT
        s = R.multiply_by_quantized_multiplier(xa, *self.ma) + \
            R.multiply_by_quantized_multiplier(xb, *self.mb)
        R.check_int32(s, "integer add")
        return R.requantize(s, *self.mo, self.out.zero_point, *self.clamp)


class IntegerShortcut(nn.Module):
    """Option-A shortcut on codes: subsample, pad new channels with the zero point."""

    def __init__(self, shortcut: nn.Module, zero_point: int):
        super().__init__()
        self.stride = getattr(shortcut, "stride", 1)
        self.extra = getattr(shortcut, "extra", 0)
        self.zero_point = zero_point
        if not isinstance(shortcut, nn.Identity) and not hasattr(shortcut, "extra"):
            raise ConfigError(f"integer inference: shortcut {type(shortcut).__name__} not "
                              "supported; allowed: Identity, PadShortcut (option A)")

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if isinstance(self.stride, int) and self.stride > 1:
            q = q[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            q = F.pad(q, (0, 0, 0, 0, half, self.extra - half), value=self.zero_point)
        return q


@dataclass
class Op:
    """One step of the integer graph: ``fn(*[tensors[i] for i in inputs]) -> tensors[output]``."""

    fn: object
    inputs: tuple[str, ...]
    output: str
    kind: str


class IntegerModel(nn.Module):
    """Runs :class:`Op` s in order on a dict of named integer tensors (module docstring)."""

    def __init__(self, input_name: str, input_q: ActQParams, ops: list[Op]):
        super().__init__()
        self.input_name, self.input_q = input_name, input_q
        self.ops = ops
        self.steps = nn.ModuleList([op.fn for op in ops if isinstance(op.fn, nn.Module)])
        self.codes: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, forced: dict[str, torch.Tensor] | None = None,
                record: bool = False) -> torch.Tensor:
        """Float image -> float logits through integer layers. ``forced``: codes to use for
        named tensors instead of computing them (per-layer checks); ``record``: keep every
        named tensor's codes in ``self.codes``."""
        forced = forced or {}
        t = {self.input_name: forced.get(self.input_name, self.input_q.quantize(x))}
        out = None
        for op in self.ops:
            out = op.fn(*[forced[i] if i in forced else t[i] for i in op.inputs])
            t[op.output] = out
        self.codes = t if record else {}
        return out


# -- conversion -----------------------------------------------------------------------------

_LEAVES = (QuantBasicBlock, Quantizer)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return is_fake_quant(m) or isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _chain(model: nn.Module) -> list[tuple[str, object, fx.Node]]:
    """The model as a chain of (kind, target, node); every node feeds only the next."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow etc.
        raise ConfigError(f"integer inference: {type(model).__name__} cannot be traced by "
                          f"torch.fx ({type(e).__name__}: {e})") from None
    mods = dict(model.named_modules())
    out = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            m = mods[node.target]
            if is_fake_quant(m):
                kind = "layer"
            elif isinstance(m, QuantBasicBlock):
                kind = "block"
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                kind = "identity"
            elif isinstance(m, nn.ReLU):
                kind = "relu"
            elif isinstance(m, nn.ReLU6):
                kind = "relu6"
            elif isinstance(m, nn.Flatten):
                kind = "flatten"
            elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
                kind = "avgpool"
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                raise ConfigError(f"integer inference: layer {node.target} is not quantized "
                                  "(every layer must be: quant.first_last=quantize or 8bit, no skip "
                                  "overrides)")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise ConfigError(f"integer inference: BatchNorm {node.target} is not folded "
                                  "(quant.fold_bn=true, and its conv/linear quantized)")
            else:
                raise ConfigError(f"integer inference: module {node.target} "
                                  f"({type(m).__name__}) is not supported; allowed: quantized "
                                  "Conv2d/Linear (BN folded), ReLU, ReLU6, Flatten, Identity, "
                                  "AdaptiveAvgPool2d(1), quantized residual blocks")
            out.append((kind, node.target, node))
            continue
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        if name in ("relu", "relu_"):
            kind = "relu"
        elif name == "relu6":
            kind = "relu6"
        elif name == "flatten":
            kind = "flatten"
        elif name == "adaptive_avg_pool2d" and node.args[1:] in ((1,), ((1, 1),)):
            kind = "avgpool"
        else:
            raise ConfigError(f"integer inference: operation {name} (node {node.name}) is not "
                              "supported; allowed: relu, relu6, flatten, adaptive_avg_pool2d(1)")
        out.append((kind, name, node))
    for (_, _, a), (_, _, b) in zip(out, out[1:]):
        if list(a.users) != [b]:
            raise ConfigError(f"integer inference: the model is not a chain at {a.name} -> "
                              f"{[u.name for u in a.users]} (residual adds must be inside "
                              "quantized residual blocks)")
    return out


def _own_in_quantizer(model, kind, target) -> tuple[str, nn.Module] | None:
    """The (name, quantizer) that quantizes this consumer's input, if it has its own."""
    m = model.get_submodule(target)
    if kind == "block":
        return f"{target}.input_quantizer", m.input_quantizer
    if m.act_quantizer is None:
        return None
    return f"{target}.act_quantizer", m.act_quantizer


def _out_quantizer(model, kind, target) -> tuple[str, nn.Module] | None:
    """A block that quantizes its own output (the last one before pooling)."""
    if kind != "block":
        return None
    q = model.get_submodule(target).output_quantizer
    return None if q is None else (f"{target}.output_quantizer", q)


def to_integer_model(model: nn.Module) -> IntegerModel:
    """Build the integer model of a trained fake-quant model (eval statistics)."""
    model = model.eval()
    chain = _chain(model)
    consumers = [i for i, (k, _, _) in enumerate(chain) if k in ("layer", "block")]
    if not consumers:
        raise ConfigError("integer inference: the model has no quantized layer")
    for k, _, _ in chain[: consumers[0]]:
        if k not in ("identity", "flatten"):
            raise ConfigError(f"integer inference: a {k} runs before the first quantized layer")
    # the named tensor each consumer reads: its own input quantizer's, or the output
    # quantizer of the block before it
    inputs, prev_out = [], None
    for i in consumers:
        kind, target, _ = chain[i]
        own = _own_in_quantizer(model, kind, target)
        if own is not None and prev_out is not None:
            raise ConfigError(f"integer inference: {target} re-quantizes the already quantized "
                              f"output {prev_out[0]}")
        if own is None and prev_out is None:
            raise ConfigError(f"integer inference: layer {target} has no input quantizer "
                              "(quant.first_last must be 'quantize' or '8bit')")
        inputs.append(own or prev_out)
        prev_out = _out_quantizer(model, kind, target)
    qp = {name: act_qparams(q, name) for name, q in inputs}
    ops: list[Op] = []
    pooled = [False]  # pooled[pos]: global pooling runs before consumer pos
    for pos, i in enumerate(consumers):
        kind, target, _ = chain[i]
        cur = inputs[pos][0]
        nxt = consumers[pos + 1] if pos + 1 < len(consumers) else None
        between = [c for c in chain[i + 1: nxt if nxt is not None else len(chain)]
                   if c[0] != "identity"]
        acts = [k for k, _, _ in between if k in ("relu", "relu6")]
        act = acts[0] if acts else None
        if len(acts) > 1:
            raise ConfigError(f"integer inference: two activations after {target}: {acts}")
        if nxt is None and (acts or between):
            raise ConfigError(f"integer inference: {[k for k, _, _ in between]} after the output "
                              f"layer {target}")
        own_out = _out_quantizer(model, kind, target)
        if own_out is not None and acts:
            raise ConfigError(f"integer inference: {act} after the quantized output of {target}")
        if nxt is None:
            out_name, out_q = "output", None
        else:
            out_name = inputs[pos + 1][0]
            out_q = qp[out_name]
        kinds = [k for k, _, _ in between if k not in ("relu", "relu6")]
        pool = False
        if kinds == ["avgpool", "flatten"]:
            pool = True  # global pooling: summed inside the next layer's int32 accumulator
        elif kinds not in ([], ["flatten"]):
            raise ConfigError(f"integer inference: {kinds} between {target} and the next "
                              "quantized layer; allowed: flatten, or adaptive_avg_pool2d(1) + "
                              "flatten before a Linear")
        flatten = [n for k, _, n in between if k == "flatten"]
        mid = f"{out_name}:pre" if flatten and not pool else out_name
        m = model.get_submodule(target)
        if pooled[pos] and not isinstance(m, nn.Linear):
            raise ConfigError(f"integer inference: global pooling feeds {target}; allowed: a Linear")
        if kind == "layer":
            ops.append(Op(IntegerLayer(target, m, qp[cur], out_q, act, pool=pooled[pos]),
                          (cur,), mid, "layer"))
        else:
            ops += _block_ops(target, m, cur, qp, mid, out_q, act)
        if mid != out_name:
            node = flatten[0]
            if node.op == "call_module":
                start = model.get_submodule(node.target).start_dim
            else:  # torch.flatten(x, start_dim=0) / x.flatten(start_dim=0)
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            ops.append(Op(_Flatten(int(start)), (mid,), out_name, "flatten"))
        pooled.append(pool)
    return IntegerModel(inputs[0][0], qp[inputs[0][0]], ops)


def _block_ops(target, block, cur, qp, out_name, out_q, act):
    if act is not None:
        raise ConfigError(f"integer inference: block {target} followed by {act} (the block "
                          "applies its own ReLU)")
    if out_q is None:
        raise ConfigError(f"integer inference: block {target} is the network output")
    for attr in ("bn1", "bn2"):
        if not isinstance(getattr(block, attr), nn.Identity):
            raise ConfigError(f"integer inference: block {target}.{attr} is not folded "
                              "(quant.fold_bn=true)")
    c1, c2 = block.conv1, block.conv2
    if not isinstance(c1, (QuantConv2d, QuantLinear)) or c1.act_quantizer is not None:
        raise ConfigError(f"integer inference: block {target}.conv1 must be quantized with its "
                          "input quantizer moved to the block")
    h_name, br_name = f"{target}.conv2.act_quantizer", f"{target}.branch_quantizer"
    h_q = qp.setdefault(h_name, act_qparams(c2.act_quantizer, h_name))
    br_q = qp.setdefault(br_name, act_qparams(block.branch_quantizer, br_name))
    sc_name = f"{target}.shortcut"
    return [
        Op(IntegerLayer(f"{target}.conv1", c1, qp[cur], h_q, "relu"), (cur,), h_name, "layer"),
        Op(IntegerLayer(f"{target}.conv2", c2, h_q, br_q, None), (h_name,), br_name, "layer"),
        Op(IntegerShortcut(block.shortcut, qp[cur].zero_point), (cur,), sc_name, "shortcut"),
        Op(IntegerAdd(br_q, qp[cur], out_q, True), (br_name, sc_name), out_name, "add"),
    ]


class _Flatten(nn.Module):
    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def forward(self, q):
        return torch.flatten(q, self.start)


@torch.no_grad()
def fake_quant_codes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the fake-quant ``model`` (eval) on ``x`` and return (output, {quantizer name:
    integer codes of its output}) -- the reference for the per-layer comparison."""
    caps, hooks = {}, []
    for name, q in model.named_modules():
        if isinstance(q, UniformQuantizer) and q.observer == "ema":
            def hook(mod, inp, out, name=name):
                p = act_qparams(mod, name)
                caps[name] = torch.round(out.double() / p.scale).to(torch.int64) + p.zero_point
            hooks.append(q.register_forward_hook(hook))
    try:
        y = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return y, caps
