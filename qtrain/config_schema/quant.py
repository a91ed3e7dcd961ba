"""Schemas of the ``quant`` group (conf/quant/*.yaml) and of the method callbacks a recipe
adds under ``extra_callbacks`` from that group: one dataclass per callback class and per
quantizer class (the ``_target_`` of ``quant.weight`` / ``quant.act``).

Each schema names the yaml it serves; its keys and enums mirror the class's constructor and
module constants, and ``bits=`` its ``min_bits..max_bits`` (tests/test_config_schema.py
compares both with the classes, and fails for a conf/quant/*.yaml whose targets have no
schema here). A new method: add its dataclass here, next to the others.

The bit widths are checked where the callback passes them on: ``quant.bits`` against the
weight quantizer's range, ``quant.act_bits`` (or ``quant.bits`` when it is null) against the
activation quantizer's, ``quant.overrides.<regex>.bits`` likewise, ``first_last=8bit``
needs 8 bits in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import DictConfig

from qtrain.config_schema.core import SKIP, Float, Int, Node, check_value, opt, schema, schema_for
from qtrain.config_schema.core import value_of as _v
from qtrain.errors import ConfigError

LAYER_TYPES = Literal["Linear", "Conv2d", "Embedding"]  # qtrain.callbacks.qat.LAYER_TYPES
FIRST_LAST = Literal["quantize", "keep", "8bit"]  # qtrain.nn.convert.FIRST_LAST_POLICIES
UNITS = Literal["epoch", "step"]  # qtrain.callbacks.inq.UNITS / ipq.UNITS
KMEANS_INITS = Literal["random", "linear"]  # qtrain.quant.kmeans.INITS
ROUNDINGS = Literal["nearest", "stochastic", "truncate"]  # qtrain.quant.rounding.ROUNDING_MODES
SEED = Int(ge=0)
PATTERNS = str | list[str] | None  # one regex, or a list (qtrain.nn.convert.as_patterns)


# ---- quantizers (quant.weight / quant.act) ----------------------------------------------

@schema("qtrain.nn.uniform_quantizer.UniformQuantizer", bits=(1, 8),
        yaml="conf/quant/uniform.yaml, intqat.yaml, groupwise.yaml (act)")
class UniformQuantizer:
    symmetric: bool = opt()
    granularity: Literal["tensor", "channel", "group"] = opt()
    group_size: Int(ge=1) | None = opt()
    axis: int = opt()
    observer: Literal["minmax", "ema"] = opt()
    ema_decay: Float(gt=0, lt=1) = opt()

    @classmethod
    def post(cls, node, path):
        gran, obs = _v(node, "granularity"), _v(node, "observer")
        if obs == "ema" and gran not in ("tensor", SKIP):
            raise ConfigError(f"{path}.granularity={gran!r} with {path}.observer='ema': "
                              "allowed: granularity tensor (EMA ranges are per tensor)")
        if gran == "group" and _v(node, "group_size") in (None, SKIP):
            raise ConfigError(f"{path}.group_size=null with {path}.granularity='group': "
                              "allowed: an integer >= 1 (e.g. 32, 64, 128)")


@schema("qtrain.nn.learned_quantizers.LSQQuantizer", bits=(1, 8), yaml="conf/quant/lsq.yaml")
class LSQQuantizer:
    signed: bool = opt()
    role: Literal["weight", "activation"] = opt()
    init_step: Float(gt=0) | None = opt()


@schema("qtrain.nn.learned_quantizers.DoReFaWeightQuantizer", bits=(1, 8),
        yaml="conf/quant/dorefa.yaml, pact.yaml")
class DoReFaWeightQuantizer:
    pass


@schema("qtrain.nn.learned_quantizers.DoReFaActQuantizer", bits=(1, 8),
        yaml="conf/quant/dorefa.yaml")
class DoReFaActQuantizer:
    grad_bits: Int(ge=1, le=32) | None = opt()  # qtrain.quant.estimators MIN/MAX_BITS
    per_sample: bool = opt()
    seed: SEED | None = opt()
    grad_at: Literal["output", "input"] = opt()  # learned_quantizers.DOREFA_GRAD_AT


@schema("qtrain.nn.learned_quantizers.PACTQuantizer", bits=(1, 8), yaml="conf/quant/pact.yaml")
class PACTQuantizer:
    alpha_init: Float(gt=0) | Literal["calibrate"] = opt()
    l2_decay: Float(ge=0) = opt()
    calib_percentile: Float(gt=0, le=100) = opt()


@schema("qtrain.nn.learned_quantizers.DSQQuantizer", bits=(1, 8), yaml="conf/quant/dsq.yaml")
class DSQQuantizer:
    alpha_init: Float(gt=0, le=0.5) = opt()
    lower: float | None = opt()
    upper: float | None = opt()
    hard: bool = opt()
    hard_threshold: float = opt()
    ste_forward: bool = opt()


FP8 = Literal["e4m3", "e5m2", "s2fp8"]  # qtrain.nn.fp8_training.FP8_FORMATS


@schema("qtrain.nn.fp8_training.FP8TrainingQuantizer", bits=(8, 8),
        yaml="conf/quant/fp8_training.yaml")
class FP8TrainingQuantizer:
    fmt: FP8 = opt()
    grad_fmt: FP8 = opt()
    saturate: bool | None = opt()
    grad_saturate: bool | None = opt()
    rounding: ROUNDINGS = opt()
    grad_rounding: ROUNDINGS = opt()
    seed: SEED | None = opt()
    accumulation: Literal["fp32", "chunked"] = opt()  # fp8_training.ACCUMULATIONS
    chunk_size: Int(ge=1) = opt()
    acc_dtype: Literal["fp16", "bf16"] = opt()  # fp8_training.ACC_FORMATS
    grad_at: Literal["error", "gemm_outputs", "error_and_outputs"] = opt()  # GRAD_AT
    round_output: bool = opt()


@schema("qtrain.nn.groupwise_quantizer.GroupwiseQuantizer", bits=(1, 8),
        yaml="conf/quant/groupwise.yaml")
class GroupwiseQuantizer:
    num_groups: Int(ge=1) = opt()
    num_heads: Int(ge=1) = opt()
    symmetric: bool = opt()


@schema("qtrain.nn.abc_quantizer.ABCWeightQuantizer", bits=(1, 8), yaml="conf/quant/abc.yaml")
class ABCWeightQuantizer:
    per_channel: bool = opt()


@schema("qtrain.nn.abc_quantizer.ABCActQuantizer", bits=(1, 8), yaml="conf/quant/abc.yaml")
class ABCActQuantizer:
    v_init: list[float] | None = opt()
    beta_init: list[float] | float | None = opt()
    ste_gain: Float(gt=0) = opt()


@schema("qtrain.nn.lab_quantizer.LABWeightQuantizer", bits=(1, 1), yaml="conf/quant/lab.yaml")
class LABWeightQuantizer:
    pass


@schema("qtrain.nn.bucket_quantizer.BucketUniformQuantizer", bits=(1, 16),
        yaml="conf/quant/polino_bucket.yaml")
class BucketUniformQuantizer:
    bucket_size: Int(ge=1) = opt()
    rounding: Literal["nearest", "stochastic"] = opt()
    seed: SEED | None = opt()


@schema("qtrain.nn.polino_quantizer.PolinoDifferentiableQuantizer", bits=(1, 8),
        yaml="conf/quant/polino_differentiable.yaml")
class PolinoDifferentiableQuantizer:
    bucket_size: Int(ge=1) | None = opt()
    ste: bool = opt()
    init: Literal["quantiles", "uniform"] = opt()  # polino_quantizer.INITS


CALIBRATIONS = Literal["minmax", "ema", "percentile", "mse", "kl", "aciq", "aciq-laplace",
                       "aciq-gaussian"]  # qtrain.nn.observers.make_observer


@schema("qtrain.nn.calibrated_quantizer.CalibratedQuantizer", bits=(1, 8), open_keys=True,
        yaml="conf/quant/ptq.yaml")
class CalibratedQuantizer:
    """Other keys are the observer's options (``**observer_kwargs``: momentum, bins, ...)."""

    calibration: CALIBRATIONS = opt()
    symmetric: bool = opt()
    name: str = opt()


@schema("qtrain.nn.calibrated_quantizer.ValueAwareQuantizer", bits=(1, 8),
        yaml="conf/quant/value_aware.yaml")
class ValueAwareQuantizer:
    ratio: Float(gt=0, lt=1) = opt()
    symmetric: bool = opt()
    name: str = opt()


@schema("qtrain.nn.format_quantizers.FixedPointQuantizer", bits=(2, 32),
        yaml="conf/quant/stochastic_fixed16.yaml")
class FixedPointQuantizer:
    frac_bits: Int(ge=0) = opt()  # < the word length (quant.bits / act_bits): the callback
    rounding: ROUNDINGS = opt()
    seed: SEED | None = opt()


@schema("qtrain.nn.format_quantizers.TTQQuantizer", bits=(2, 2), yaml="conf/quant/ttq.yaml")
class TTQQuantizer:
    threshold: Float(gt=0, lt=1) = opt()
    init_scale: Float(gt=0) | None = opt()


@schema("qtrain.nn.format_quantizers.TWNQuantizer", bits=(2, 2), yaml="conf/quant/twn.yaml")
class TWNQuantizer:
    per_channel: bool = opt()
    delta_factor: Float(gt=0) = opt()


@schema("qtrain.nn.format_quantizers.BinaryWeightQuantizer", bits=(1, 1),
        yaml="conf/quant/xnor.yaml")
class BinaryWeightQuantizer:
    scale_grad: bool = opt()


@schema("qtrain.nn.format_quantizers.XNORActQuantizer", bits=(1, 1), yaml="conf/quant/xnor.yaml")
class XNORActQuantizer:
    act_scaling: Literal["mean_abs", "none"] = opt()  # format_quantizers.XNOR_ACT_SCALINGS
    scale_grad: bool = opt()


# ---- callbacks (quant._target_, extra_callbacks.<name>._target_) ------------------------

def _range(qnode) -> tuple[tuple[int, int] | None, str]:
    cls = schema_for(qnode)
    if cls is None or cls.__bits__ is None:
        return None, ""
    return cls.__bits__, cls.__target__.rsplit(".", 1)[-1]


def _bits_fit(key: str, bits, qnode, where: str, note: str = "") -> None:
    """``bits`` (the value of ``key``) an integer in the range of the quantizer ``qnode``
    builds (any integer >= 1 when its class has no schema)."""
    if bits is SKIP:
        return
    rng, name = _range(qnode)
    if rng is None:
        check_value(key, bits, Int(ge=1), where)
        return
    lo, hi = rng
    check_value(key, bits, Int(ge=lo, le=hi) if lo != hi else Literal[lo],
                f"{name}, {where}{note}")


def _fixed_point_format(path: str, key: str, bits, qnode, role: str) -> None:
    if schema_for(qnode) is not FixedPointQuantizer or not isinstance(bits, int):
        return
    fl = _v(qnode, "frac_bits")
    if isinstance(fl, int) and not fl <= bits - 1:
        raise ConfigError(f"{path}.{role}.frac_bits={fl} with {key}={bits}: allowed: "
                          f"0..{bits - 1} (integer bits = bits - frac_bits >= 1: the sign bit)")


def _get(node, key):
    return node.get(key) if key in node else None


@schema("qtrain.callbacks.qat.QATCallback",
        yaml="conf/quant/*.yaml with _target_ qtrain.callbacks.qat.QATCallback")
class QATCallback:
    bits: Int(ge=1) = opt()  # the range: the weight quantizer's (pre)
    weight: Node | None = opt()
    act: Node | None = opt()
    act_bits: Int(ge=1) | None = opt()  # the range: the activation quantizer's (pre)
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    types: list[LAYER_TYPES] = opt()
    first_last: FIRST_LAST = opt()
    overrides: dict[str, dict[Literal["bits", "act_bits", "skip"], Any]] | None = opt()
    start_epoch: Int(ge=0) = opt()
    fold_bn: bool = opt()
    bn_freeze_step: Int(ge=0) | None = opt()
    quantize_residual: bool = opt()
    integer_eval: bool = opt()

    @classmethod
    def pre(cls, node: DictConfig, path: str) -> None:
        """Bit widths vs the quantizer classes that receive them."""
        w, a = _get(node, "weight"), _get(node, "act")
        bits = _v(node, "bits") if "bits" in node else SKIP
        act_bits = _v(node, "act_bits") if "act_bits" in node else None
        _bits_fit(f"{path}.bits", bits, w, f"{path}.weight")
        _fixed_point_format(path, f"{path}.bits", bits, w, "weight")
        if a is not None:
            if act_bits is None:
                _bits_fit(f"{path}.bits", bits, a, f"{path}.act",
                          f"; {path}.act_bits=null uses {path}.bits")
                _fixed_point_format(path, f"{path}.bits", bits, a, "act")
            else:
                _bits_fit(f"{path}.act_bits", act_bits, a, f"{path}.act")
                _fixed_point_format(path, f"{path}.act_bits", act_bits, a, "act")
        overrides = _v(node, "overrides") if "overrides" in node else None
        for pat, o in (overrides if isinstance(overrides, dict) else {}).items():
            for k, q, role in (("bits", w, "weight"), ("act_bits", a, "act")):
                if isinstance(o, dict) and k in o:
                    _bits_fit(f"{path}.overrides.{pat}.{k}", o[k], q, f"{path}.{role}")
            if isinstance(o, dict) and "skip" in o:
                check_value(f"{path}.overrides.{pat}.skip", o["skip"], bool)
        if "first_last" in node and _v(node, "first_last") == "8bit":
            for role, q in (("weight", w), ("act", a)):
                rng, name = _range(q)
                if rng is not None and not rng[0] <= 8 <= rng[1]:
                    raise ConfigError(
                        f"{path}.first_last='8bit': {name} ({path}.{role}) supports "
                        f"{rng[0]}..{rng[1]} bits, not 8; allowed: quantize, keep")

    @classmethod
    def post(cls, node: DictConfig, path: str) -> None:
        if "weight" in node and "act" in node and node.weight is None and node.act is None:
            raise ConfigError(f"{path}.weight=null and {path}.act=null: nothing to quantize; "
                              "allowed: at least one quantizer")


@schema("qtrain.callbacks.ptq.PTQCallback", yaml="conf/quant/ptq.yaml")
class PTQCallback(QATCallback):
    num_batches: Int(ge=1) = opt()


@schema("qtrain.callbacks.lab.LABCallback", yaml="conf/quant/lab.yaml")
class LABCallback(QATCallback):
    clip: Float(gt=0) | None = opt()


INQ_SCHEDULES = Literal["5bit", "4bit", "3bit", "2bit"]  # qtrain.quant.inq.SCHEDULES


@dataclass
class IncrementalStages:
    """The INQ-style staged schedule shared by INQ and ELQ (their constructors' common keys)."""
    schedule: INQ_SCHEDULES | list[Float(gt=0, le=1)] = opt()
    strategy: Literal["magnitude", "random"] = opt()  # qtrain.quant.inq.STRATEGIES
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    types: list[Literal["Conv2d", "Linear"]] = opt()
    boundaries: list[Int(ge=0)] | None = opt()
    stage_length: Int(ge=1) = opt()
    start: Int(ge=0) = opt()
    unit: UNITS = opt()
    reset_optimizer: bool = opt()
    seed: SEED = opt()
    convert_at_end: bool = opt()


@schema("qtrain.callbacks.inq.INQCallback", yaml="conf/quant/inq.yaml")
class INQCallback(IncrementalStages):
    bits: Int(ge=2, le=8) = opt()  # qtrain.quant.pow2.inq_exponent_range


@schema("qtrain.callbacks.ipq.IterativePQCallback", yaml="conf/quant/ipq.yaml")
class IterativePQCallback:
    stages: Literal["fairseq_transformer", "hf_bert", "cnn"] | list[Any] = opt()
    exclude: PATTERNS = opt()
    n_centroids: Int(ge=1) = opt()
    n_iter: Int(ge=1) = opt()
    block_sizes: dict[Literal["fc", "attention", "embedding", "conv1x1", "conv"],
                      Int(ge=1)] | None = opt()
    boundaries: list[Int(ge=0)] | None = opt()
    stage_length: Int(ge=1) = opt()
    start: Int(ge=0) = opt()
    unit: UNITS = opt()
    activation_aware: bool = opt()
    max_sample_rows: Int(ge=1) = opt()
    forward_fn: Any = opt()
    lr_schedule: Literal["continue", "restart"] = opt()
    seed: SEED = opt()
    clamp_centroids: bool = opt()
    on_incomplete: Literal["quantize", "error"] = opt()  # ipq.ON_INCOMPLETE


DC_TYPES = Literal["Conv2d", "Linear"]  # qtrain.callbacks.deep_compression.LAYER_TYPES


@schema("qtrain.callbacks.deep_compression.DeepCompressionCallback",
        yaml="conf/quant/deep_compression.yaml")
class DeepCompressionCallback:
    sparsity: dict[DC_TYPES, Float(ge=0, lt=1)] | None = opt()
    layer_sparsity: dict[str, Float(ge=0, lt=1)] | None = opt()
    bits: dict[DC_TYPES, Int(ge=1, le=16)] | None = opt()
    layer_bits: dict[str, Int(ge=1, le=16)] | None = opt()
    index_bits: dict[DC_TYPES, Int(ge=1, le=16)] | None = opt()
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    start: Int(ge=0) = opt()
    prune_epochs: list[Int(ge=0)] = opt()
    quantize_epoch: Int(ge=0) | None = opt()
    n_iter: Int(ge=1) = opt()
    init: KMEANS_INITS = opt()
    reset_optimizer: bool = opt()
    seed: SEED = opt()
    split_empty: bool = opt()
    finalize_at_end: bool = opt()
    report_file: str | None = opt()
    huffman_file: str | None = opt()


QN_TYPES = Literal["Linear", "Conv2d", "Embedding"]  # qtrain.callbacks.quant_noise.TYPE_KEYS
QN_MODE_BITS = {"int8": 8, "int4": 4, "pq": None, "drop": None}  # qtrain.nn.quant_noise.MODES


@schema("qtrain.callbacks.quant_noise.QuantNoiseCallback", yaml="conf/quant/quant_noise.yaml")
class QuantNoiseCallback:
    p: Float(ge=0, le=1) | dict[QN_TYPES, Float(ge=0, le=1)] = opt()
    block_size: Int(ge=1) | dict[QN_TYPES, Int(ge=1)] = opt()
    mode: Literal["int8", "int4", "pq", "drop"] = opt()
    bits: Int(ge=1, le=32) | None = opt()
    granularity: Literal["tensor", "channel"] = opt()  # qtrain.nn.quant_noise.GRANULARITIES
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    types: list[QN_TYPES] = opt()
    compare_eval: bool = opt()
    metric_fn: Any = opt()
    max_eval_batches: Int(ge=1) | None = opt()
    seed: SEED = opt()
    pq_refresh: Int(ge=1) = opt()
    clamp_centroids: bool = opt()
    test_eval_p: Float(ge=0, le=1) = opt()
    quantize_activations: bool = opt()
    act_p: Float(ge=0, le=1) = opt()
    act_update_step: Int(ge=1) = opt()

    @classmethod
    def post(cls, node, path):
        mode, bits = _v(node, "mode"), _v(node, "bits")
        fixed = QN_MODE_BITS.get(mode) if isinstance(mode, str) else None
        if fixed is not None and bits not in (None, SKIP, fixed):
            raise ConfigError(f"{path}.bits={bits} with {path}.mode={mode!r}: allowed: {fixed} "
                              "or null")


@schema("qtrain.callbacks.vector_quant.VectorQuantizationCallback",
        yaml="conf/quant/vector_quant.yaml")
class VectorQuantizationCallback:
    method: Literal["binary", "kmeans", "pq", "rq"] = opt()  # vector_quant.METHODS
    bits: Int(ge=1, le=8) = opt()
    n_centroids: Int(ge=1, le=256) = opt()
    codebook: Literal["segment", "shared"] = opt()  # vector_quant.CODEBOOKS
    block_size: Int(ge=1) = opt()
    n_stages: Int(ge=1) = opt()
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    types: list[Literal["Linear", "Conv2d"]] = opt()
    start_epoch: Int(ge=0) = opt()
    n_iter: Int(ge=1) = opt()
    init: KMEANS_INITS = opt()
    seed: SEED = opt()
    clamp_centroids: bool = opt()


@schema("qtrain.callbacks.elq.ELQCallback", yaml="conf/quant/elq.yaml")
class ELQCallback(IncrementalStages):
    kind: Literal["binary", "ternary"] = opt()  # qtrain.quant.elq.KINDS
    lam: Float(gt=0) = opt()
    exact: bool = opt()
    max_iter: Int(ge=1) = opt()
    stages_file: str | None = opt()


PROJECTIONS = Literal["none", "binary", "stochastic_binary", "kquant", "power", "clip",
                      "mult_noise", "add_noise", "stochastic_multiply"]  # qtrain.quant.distortions.PROJECTIONS
SPEC_KEYS = Literal["projection", "levels", "beta", "clip", "sigma", "gamma", "rounding", "rule",
                    "p", "granularity"]  # qtrain.nn.distortion_quantizer.SPEC_KEYS


@schema("qtrain.callbacks.weight_distortion.WeightDistortionCallback",
        yaml="conf/quant/merolla.yaml")
class WeightDistortionCallback(QATCallback):
    """``train`` / ``test``: projection specs (the projection's own ranges: its class)."""

    train: dict[SPEC_KEYS, Any] | None = opt()
    test: dict[SPEC_KEYS, Any] | None = opt()
    scale: Literal["max_abs", "mean_abs", "none"] = opt()  # qtrain.quant.distortions.SCALES
    seed: SEED | None = opt()
    clip_weights: Float(gt=0) | None = opt()
    clip_scale: Literal["absolute", "init_std"] = opt()  # weight_distortion.CLIP_SCALES

    @classmethod
    def post(cls, node, path):
        for part in ("train", "test"):
            spec = _v(node, part) if part in node else None
            if isinstance(spec, dict):
                names = PROJECTIONS if part == "test" else PROJECTIONS | Literal["mixture"]
                if "projection" in spec:
                    check_value(f"{path}.{part}.projection", spec["projection"], names)
                if "rule" in spec:
                    check_value(f"{path}.{part}.rule", spec["rule"], PROJECTIONS)
                if "granularity" in spec:
                    check_value(f"{path}.{part}.granularity", spec["granularity"],
                                Literal["layer", "weight"])  # distortions.GRANULARITIES


@schema("qtrain.callbacks.soft_to_hard_vq.SoftToHardVQCallback",
        yaml="conf/quant/soft_to_hard_vq.yaml")
class SoftToHardVQCallback:
    bits: Int(ge=1, le=12) = opt()  # qtrain.nn.learned_quantizers.SoftToHardVQ min/max_bits
    dim: Int(ge=1) = opt()
    sigma_start: Float(gt=0) = opt()
    sigma_end: Float(gt=0) = opt()
    sigma_units: Literal["absolute", "variance"] = opt()  # learned_quantizers.SIGMA_UNITS
    beta: Float(ge=0) = opt()
    hard_epochs: Int(ge=0) = opt()
    seed: SEED = opt()
    include: PATTERNS = opt()
    exclude: PATTERNS = opt()
    types: list[LAYER_TYPES] = opt()
    first_last: FIRST_LAST = opt()
    overrides: dict[str, dict[Literal["bits", "act_bits", "skip"], Any]] | None = opt()
    start_epoch: Int(ge=0) = opt()

    @classmethod
    def post(cls, node, path):
        lo, hi = _v(node, "sigma_start"), _v(node, "sigma_end")
        if isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
            raise ConfigError(f"{path}.sigma_end={hi} < {path}.sigma_start={lo}: allowed: "
                              "sigma_end >= sigma_start > 0")
