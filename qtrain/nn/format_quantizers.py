"""Quantizer modules for the non-uniform formats (plug into QuantLinear/QuantConv2d slots).

Each wraps the pure math of :mod:`qtrain.quant` (papers and equations cited there) and
reports exact ``storage_bits`` (codes + scales; the storage convention is stated per class).
Constructors take ``bits`` first. Random rounding uses a per-module ``torch.Generator``
seeded from ``seed`` (reproducible runs); ``seed=None`` uses torch's global RNG.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant import binary, fixed_point, floats, pow2, ternary
from qtrain.quant import uniform as U
from qtrain.quant.rounding import check_rounding, fake_quantize_rounded

SCALE_BITS = 32  # fp32 scales
EXPONENT_BITS = 8  # an int8 shared exponent / power-of-two scale exponent
FLOAT_FORMATS_BY_BITS = {8: ("e4m3", "e5m2"), 16: ("fp16", "bf16")}


class _SeededRounding:
    """Mixin: ``self.rounding`` and a lazily created generator per device."""

    def _init_rounding(self, rounding: str, seed: int | None) -> None:
        self.rounding = check_rounding(rounding)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.rounding != "stochastic" or self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]


def _channels(weight: torch.Tensor) -> int:
    return weight.shape[0] if weight.dim() > 1 else 1


class BinaryWeightQuantizer(Quantizer):
    """XNOR-Net weights alpha * sign(W), alpha = mean|W| per output channel.

    Storage: 1 bit per weight + one fp32 alpha per output channel.
    """

    min_bits = max_bits = 1

    def __init__(self, bits: int = 1, scale_grad: bool = True) -> None:
        super().__init__(bits)
        self.scale_grad = scale_grad

    def quantize(self, x):
        return binary.xnor_binarize(x, self.scale_grad)

    def codes(self, weight):
        return (weight >= 0).to(torch.int32)

    def storage_bits(self, weight):
        return weight.numel() + SCALE_BITS * _channels(weight)


class BinaryActQuantizer(Quantizer):
    """BNN activations sign(x) in {-1, +1}, clipped STE. Storage: 1 bit per element."""

    min_bits = max_bits = 1

    def quantize(self, x):
        return binary.binarize_activation(x)

    def codes(self, weight):
        return (weight >= 0).to(torch.int32)

    def storage_bits(self, weight):
        return weight.numel()


XNOR_ACT_SCALINGS = ("mean_abs", "none")


class XNORActQuantizer(BinaryActQuantizer):
    """XNOR-Net binary inputs (Rastegari et al. 2016, Sec. 3.2): sign(I) with the clipped
    STE, and the layer's output scaled by K of eq. (11) (see :mod:`qtrain.quant.binary`),
    so the binary conv is (sign(I) (*) sign(W)) . K alpha (+ bias).

    Args:
        act_scaling: 'mean_abs' (the paper's K = A * k, A = mean over input channels of
            |I|, k the kernel-sized box filter at the conv's stride/padding/dilation; a
            Linear layer gets K = mean |x| per sample) | 'none' (K = 1: BNN's plain sign,
            as :class:`BinaryActQuantizer`).
        scale_grad: differentiate K with respect to I (default) or treat it as a constant.
    The layer applies K (it knows the geometry): :mod:`qtrain.nn.fake_quant` and the packed
    layers call :meth:`input_scale`. Storage: 1 bit per element (K is computed from the
    input at run time; nothing is stored).
    """

    def __init__(self, bits: int = 1, act_scaling: str = "mean_abs", scale_grad: bool = True):
        super().__init__(bits)
        if act_scaling not in XNOR_ACT_SCALINGS:
            raise ConfigError(f"XNORActQuantizer: act_scaling={act_scaling!r}; allowed: "
                              f"{XNOR_ACT_SCALINGS}")
        self.act_scaling, self.scale_grad = act_scaling, scale_grad

    def input_scale(self, x: torch.Tensor, geometry: dict | None) -> torch.Tensor | None:
        """K for the raw input ``x`` of a layer with conv ``geometry`` (keys kernel_size,
        stride, padding, dilation, groups, out_channels, padding_mode; None: linear), or None
        when no scaling applies (disabled, or act_scaling='none')."""
        if not self.enabled or self.act_scaling == "none":
            return None
        return binary.xnor_input_scale(x, **(geometry or {}), scale_grad=self.scale_grad)

    def extra_repr(self):
        return f"{super().extra_repr()}, act_scaling={self.act_scaling}"


class TWNQuantizer(Quantizer):
    """Ternary Weight Networks (Delta = 0.7 mean|W|, fitted alpha), straight-through.

    Storage: 2 bits per weight + one fp32 alpha per tensor (or per output channel).
    """

    min_bits = max_bits = 2

    def __init__(
        self, bits: int = 2, per_channel: bool = False,
        delta_factor: float = ternary.TWN_DELTA_FACTOR,
    ) -> None:
        super().__init__(bits)
        self.per_channel = per_channel
        self.delta_factor = delta_factor

    def quantize(self, x):
        return ternary.twn_ternarize(x, self.per_channel, self.delta_factor)

    def codes(self, weight):
        delta, _ = ternary.twn_params(weight, self.per_channel, self.delta_factor)
        return ternary.twn_codes(weight, delta).to(torch.int32)

    def storage_bits(self, weight):
        n = _channels(weight) if self.per_channel else 1
        return 2 * weight.numel() + SCALE_BITS * n


class TTQQuantizer(Quantizer):
    """Trained Ternary Quantization with learned scales ``w_p``, ``w_n`` (nn.Parameters).

    The scales are initialised on the first forward to ``init_scale`` (conf/quant/ttq.yaml:
    1.0, as the paper's code starts from 1 on [-1, 1]-normalised weights; the masks and the
    forward do not depend on that normalisation, only the scales' size relative to their
    summed gradients does) or, with ``init_scale=None``, to the mean |W| over the positive
    and negative sets. Measured (resnet20 CIFAR-10, 1 quantized epoch at lr 0.1): mean-|W|
    init flipped W_p or W_n negative in 16 of 18 layers (17.1%); init 1.0 kept all positive
    near 1 (34.7%). Call :meth:`init_scales` explicitly to initialise before building the
    optimizer's state. Storage: 2 bits per weight + two fp32 scales.
    """

    min_bits = max_bits = 2

    def __init__(self, bits: int = 2, threshold: float = ternary.TTQ_THRESHOLD,
                 init_scale: float | None = None) -> None:
        super().__init__(bits)
        if not 0 < threshold < 1:
            raise ValueError(f"TTQQuantizer: threshold={threshold} must be in (0, 1)")
        if init_scale is not None and not init_scale > 0:
            raise ValueError(f"TTQQuantizer: init_scale={init_scale} must be > 0 (or None)")
        self.threshold = threshold
        self.init_scale = init_scale
        self.w_p = nn.Parameter(torch.tensor(1.0))
        self.w_n = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_scales(self, weight: torch.Tensor) -> None:
        if self.init_scale is not None:  # the paper's scale: latent weights in [-1, 1]
            self.w_p.fill_(self.init_scale)
            self.w_n.fill_(self.init_scale)
            self.initialized.fill_(True)
            return
        pos, neg = ternary.ttq_masks(weight, self.threshold)
        a = weight.detach().abs()
        self.w_p.fill_((a * pos).sum().item() / max(int(pos.sum()), 1))
        self.w_n.fill_((a * neg).sum().item() / max(int(neg.sum()), 1))
        self.initialized.fill_(True)

    def quantize(self, x):
        if not bool(self.initialized):
            self.init_scales(x)
        return ternary.ttq_ternarize(x, self.w_p, self.w_n, self.threshold)

    def codes(self, weight):
        pos, neg = ternary.ttq_masks(weight, self.threshold)
        return pos.to(torch.int32) - neg.to(torch.int32)

    def storage_bits(self, weight):
        return 2 * weight.numel() + 2 * SCALE_BITS


class PowerOfTwoQuantizer(Quantizer):
    """INQ power-of-two levels {0, +-2^n2..+-2^n1} (straight-through gradient).

    Storage: ``bits`` per weight + the int8 exponent n1 per tensor.
    """

    min_bits, max_bits = pow2.INQ_MIN_BITS, pow2.INQ_MAX_BITS

    def quantize(self, x):
        return pow2.inq_quantize(x, self.bits)

    def codes(self, weight):
        levels = pow2.inq_levels(weight, self.bits)
        q = pow2.round_to_levels(weight, levels)
        return torch.bucketize(q, levels).to(torch.int32)

    def storage_bits(self, weight):
        return self.bits * weight.numel() + EXPONENT_BITS


class ShiftScaleQuantizer(UniformQuantizer):
    """Uniform quantizer whose scales are powers of two (shift-only rescaling).

    Same options as :class:`UniformQuantizer` plus ``scale_mode`` ('ceil' never clips,
    'nearest' rounds log2 s). Affine zero-points are recomputed for the rounded scale.
    Storage: codes + an int8 scale exponent (+ a ``bits``-bit zero-point if affine) per
    tensor/channel/group.
    """

    def __init__(self, bits: int = 8, *args, scale_mode: str = "ceil", **kw) -> None:
        super().__init__(bits, *args, **kw)
        pow2.pow2_scale(torch.ones(1), scale_mode)  # validates
        self.scale_mode = scale_mode

    def qparams(self, x):
        qp = super().qparams(x)
        scale = pow2.pow2_scale(qp.scale, self.scale_mode)
        if self.symmetric:
            zp = qp.zero_point
        else:
            lo = (qp.qmin - qp.zero_point) * qp.scale  # the range minimum seen
            zp = (qp.qmin - torch.round(lo / scale)).clamp(qp.qmin, qp.qmax)
        return U.QParams(scale, zp, qp.qmin, qp.qmax)

    def storage_bits(self, weight):
        zp = 0 if self.symmetric else self.bits
        return weight.numel() * self.bits + self._n_params(weight) * (EXPONENT_BITS + zp)


class StochasticUniformQuantizer(_SeededRounding, UniformQuantizer):
    """:class:`UniformQuantizer` with a selectable rounding (default stochastic, Gupta 2015).

    ``rounding``: 'stochastic' | 'nearest' | 'truncate'; ``seed`` makes it reproducible.
    """

    def __init__(
        self, bits: int = 8, *args, rounding: str = "stochastic", seed: int | None = None, **kw
    ) -> None:
        super().__init__(bits, *args, **kw)
        self._init_rounding(rounding, seed)

    def quantize(self, x):
        qp = self.qparams(x)
        gen = self.generator(x.device)
        if self.granularity == "group":
            g = U.grouped(x, self.group_size)
            return fake_quantize_rounded(g, qp, self.rounding, gen).reshape(x.shape)
        return fake_quantize_rounded(x, qp, self.rounding, gen)


class DynamicFixedPointQuantizer(_SeededRounding, Quantizer):
    """Das 2018 dynamic fixed point: b-bit integers with a shared per-tensor exponent
    (not Gupta 2015's static <IL, FL> format: that is :class:`FixedPointQuantizer`).

    Storage: ``bits`` per element + one int8 exponent.
    """

    min_bits, max_bits = fixed_point.DFP_MIN_BITS, fixed_point.DFP_MAX_BITS

    def __init__(self, bits: int = 16, rounding: str = "nearest", seed: int | None = None):
        super().__init__(bits)
        self._init_rounding(rounding, seed)

    def quantize(self, x):
        return fixed_point.fake_dfp(x, self.bits, self.rounding, self.generator(x.device))

    def codes(self, weight):
        return fixed_point.dfp_codes(weight, self.bits)[0].to(torch.int32)

    def storage_bits(self, weight):
        return self.bits * weight.numel() + fixed_point.EXPONENT_BITS


class FixedPointQuantizer(_SeededRounding, Quantizer):
    """Gupta et al. 2015 static fixed point <IL, FL>: WL = ``bits`` = IL + FL, step 2^-FL,
    saturation to [-2^(IL-1), 2^(IL-1) - 2^-FL] (see :mod:`qtrain.quant.fixed_point`).

    Args:
        bits: word length WL (2..32).
        frac_bits: FL, the fractional bits (IL = bits - frac_bits must be >= 1).
        rounding: 'stochastic' (Gupta eq. 2, default) | 'nearest' (eq. 1) | 'truncate'.
        seed: seeds this module's generator for stochastic rounding (None: global RNG).
    Unlike :class:`DynamicFixedPointQuantizer` the format does not adapt to the tensor:
    values beyond the range saturate. Storage: ``bits`` per element (the format is static,
    no scale or exponent is stored).
    """

    min_bits, max_bits = 2, fixed_point.FIXED_MAX_WORD_LENGTH

    def __init__(self, bits: int = 16, frac_bits: int = 14, rounding: str = "stochastic",
                 seed: int | None = None) -> None:
        super().__init__(bits)
        self.frac_bits = frac_bits
        self._check_format(bits)
        self._init_rounding(rounding, seed)

    def _check_format(self, bits: int) -> None:
        fl = self.frac_bits
        if not isinstance(fl, int) or isinstance(fl, bool) or not 0 <= fl <= bits - 1:
            raise ConfigError(f"FixedPointQuantizer: frac_bits={fl!r} with bits={bits}; allowed: "
                              f"an int in 0..{bits - 1} (IL = bits - frac_bits >= 1: the sign bit)")

    @property
    def int_bits(self) -> int:
        return self.bits - self.frac_bits

    def set_bits(self, bits: int) -> None:
        """Change the word length, keeping FL (IL = bits - FL must stay >= 1)."""
        self._check_format(self._check_bits(bits))
        super().set_bits(bits)

    def quantize(self, x):
        return fixed_point.fake_fixed(x, self.int_bits, self.frac_bits, self.rounding,
                                      self.generator(x.device))

    def codes(self, weight):
        return fixed_point.fixed_codes(weight, self.int_bits, self.frac_bits).to(torch.int32)

    def storage_bits(self, weight):
        return self.bits * weight.numel()

    def extra_repr(self):
        return (f"bits={self.bits}, <IL, FL>=<{self.int_bits}, {self.frac_bits}>, "
                f"rounding={self.rounding}, enabled={self.enabled}")


class FloatQuantizer(_SeededRounding, Quantizer):
    """Simulated FP16 / BF16 (bits=16) or FP8 E4M3 / E5M2 (bits=8); see qtrain.quant.floats.

    Args:
        bits: 8 or 16.
        fmt: 'e4m3' (default for 8) | 'e5m2' | 'fp16' (default for 16) | 'bf16'.
        saturate: overflow behaviour (None: as the torch cast; True: clamp to +-max;
            False: inf, or NaN for e4m3).
        rounding: 'nearest' (half to even) | 'stochastic' | 'truncate'.
    Storage: ``bits`` per element (no scale).
    """

    min_bits, max_bits = 8, 16

    def __init__(
        self, bits: int = 8, fmt: str | None = None, saturate: bool | None = None,
        rounding: str = "nearest", seed: int | None = None,
    ) -> None:
        super().__init__(bits)
        if bits not in FLOAT_FORMATS_BY_BITS:
            raise ValueError(f"FloatQuantizer: bits={bits} not supported; allowed: 8, 16")
        fmt = fmt or FLOAT_FORMATS_BY_BITS[bits][0]
        if fmt not in FLOAT_FORMATS_BY_BITS[bits]:
            raise ValueError(
                f"FloatQuantizer: fmt={fmt!r} does not have {bits} bits; "
                f"allowed for {bits}: {FLOAT_FORMATS_BY_BITS[bits]}"
            )
        self.fmt, self.saturate = fmt, saturate
        self._init_rounding(rounding, seed)

    def set_bits(self, bits: int) -> None:
        """Switch width; the format becomes that width's default unless it already fits."""
        if bits not in FLOAT_FORMATS_BY_BITS:
            raise ValueError(f"FloatQuantizer: bits={bits} not supported; allowed: 8, 16")
        super().set_bits(bits)
        if self.fmt not in FLOAT_FORMATS_BY_BITS[bits]:
            self.fmt = FLOAT_FORMATS_BY_BITS[bits][0]

    def quantize(self, x):
        return floats.fake_float(x, self.fmt, self.saturate, self.rounding,
                                 self.generator(x.device))

    def storage_bits(self, weight):
        return self.bits * weight.numel()

    def extra_repr(self):
        return f"fmt={self.fmt}, saturate={self.saturate}, rounding={self.rounding}"


class S2FP8Quantizer(_SeededRounding, Quantizer):
    """Cambier 2020 S2FP8 (shifted and squeezed E5M2); see qtrain.quant.floats.

    Storage: 8 bits per element + fp32 alpha and beta per tensor.
    """

    min_bits = max_bits = 8

    def __init__(self, bits: int = 8, rounding: str = "nearest", seed: int | None = None):
        super().__init__(bits)
        self._init_rounding(rounding, seed)

    def quantize(self, x):
        return floats.fake_s2fp8(x, self.rounding, self.generator(x.device))

    def storage_bits(self, weight):
        return 8 * weight.numel() + 2 * SCALE_BITS
