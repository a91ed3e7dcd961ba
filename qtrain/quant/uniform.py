"""Uniform (integer) quantization: affine or symmetric, per-tensor / per-channel / per-group.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", eq. (1): r = S (q - Z), with integer code
q = clamp(round(r / S) + Z, q_min, q_max). Rounding is round-half-to-even (``torch.round``),
as in PyTorch's ``fake_quantize_per_*_affine`` ops, whose results these functions equal on
matching settings (tests/quant/test_uniform.py).

Code ranges:
* symmetric (signed):  q in [-2^(b-1), 2^(b-1) - 1], Z = 0, S = max|r| / ((q_max - q_min) / 2)
  (PyTorch's observer convention; 2..8 bits)
* affine (unsigned):    q in [0, 2^b - 1], S = (max - min) / (2^b - 1),
  Z = q_min - round(min / S) (1..8 bits); the range is widened to contain 0 so that 0 is
  exactly representable (zero padding, ReLU outputs).

Calibrated clip ranges (:func:`qparams_from_clip`, used by
:class:`qtrain.nn.calibrated_quantizer.CalibratedQuantizer` and the MSE search): the clip
value a calibrator computes (KL, percentile, ACIQ, MSE, min-max) is the end *level* of the
grid, so a value at the threshold is represented exactly instead of being clipped at
(2^(b-1) - 1) / (2^(b-1) - 0.5) of it (0.67 at 2 bits, 0.93 at 4) as with the observer
convention above:
* symmetric: S = alpha / (2^(b-1) - 1), Z = 0, codes [-2^(b-1), 2^(b-1) - 1] (NVIDIA
  pytorch-quantization / TensorRT: scale amax / 127 at 8 bits, narrow_range off): +-alpha are
  levels; the one extra negative code is -alpha - S.
* affine: the larger end M = max(hi, -lo) is the end code exactly (S = M / k); the smaller
  end m gets the remaining 2^b - 1 - k steps, k = floor((2^b - 1) / (1 + m / M)) the most that
  still cover it, so 0 stays exact. A non-negative range [0, hi]: S = hi / (2^b - 1), Z = 0.
  (1-bit affine on a signed range: k = 1, the smaller side collapses to 0.)

Gradient: the straight-through estimator clipped to the representable range, identical to
PyTorch's fake-quant backward: dL/dr = dL/dr_hat where q_min <= round(r/S)+Z <= q_max, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 1, 8


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range (q_min, q_max) for ``bits`` (see module docstring)."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"uniform quantization: bits={bits!r} not supported; allowed 1..8")
    if symmetric:
        if bits < 2:
            raise ValueError(
                "uniform quantization: symmetric needs bits >= 2 (for 1 bit use the binary "
                "format, qtrain.quant.binary)"
            )
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QParams:
    """Scale and zero-point of a uniform quantizer (tensors broadcastable to the input)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> QParams:
    """Scale / zero-point covering [min_val, max_val] (elementwise over channels or groups)."""
    qmin, qmax = code_range(bits, symmetric)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = (amax / ((qmax - qmin) / 2)).clamp_min(eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(eps)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return QParams(scale, zero_point, qmin, qmax)


def qparams_from_clip(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> QParams:
    """Scale / zero-point whose end level is the calibrated clip value (module docstring):
    ``dequantize(quantize(hi)) == hi`` (and ``== lo`` for the larger end / symmetric +-alpha)
    up to one fp32 rounding. Elementwise over channels or candidate ranges."""
    qmin, qmax = code_range(bits, symmetric)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = (amax / qmax).clamp_min(eps)
        return QParams(scale, torch.zeros_like(scale), qmin, qmax)
    n = qmax - qmin
    big = torch.maximum(max_val, -min_val)
    small = torch.minimum(max_val, -min_val)
    ratio = torch.where(big > 0, small.double() / big.double(), torch.zeros_like(big, dtype=torch.float64))
    # 1e-4 of a step: the fp32 rounding of lo / hi must not cost a whole step
    k = torch.floor(n / (1 + ratio) + 1e-4).clamp(1, n).to(big.dtype)
    scale = (big / k).clamp_min(eps)
    top = max_val >= -min_val  # the larger end is hi: hi -> q_max, else lo -> q_min
    zero_point = torch.where(top, qmax - k, qmin + k)
    return QParams(scale, zero_point, qmin, qmax)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` if ``x`` holds NaN or inf (calibration input)."""
    if not torch.isfinite(x).all():
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        raise ValueError(f"{what}: tensor to quantize/calibrate contains non-finite value {bad}")


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (as float tensor values) of ``x``; same shape as ``x``.

    ``x * (1 / S)`` rather than ``x / S``: PyTorch's fake-quant kernels multiply by the fp32
    reciprocal, and the two differ by one ulp often enough to flip exact .5 ties (the
    symmetric range puts max|x| / S = 2^(b-1) - 0.5 exactly on one).
    """
    return torch.clamp(torch.round(x * qp.scale.reciprocal()) + qp.zero_point, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    return (q - qp.zero_point) * qp.scale


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quant in 5 passes: ``t = round(x / S)``; ``q = clamp(t, lo, hi)``; mask ``t == q``; ``q * S``.

    With ``lo = q_min - Z`` and ``hi = q_max - Z`` this equals PyTorch's
    ``(clamp(round(x / S) + Z, q_min, q_max) - Z) * S`` exactly (small integers are exact in
    fp32) and runs ~2x faster on CPU than the fused per-tensor op, which is single-pass but
    not vectorised there (bench_qat_step.py). The saved mask is the clipped STE's
    ``lo <= t <= hi``, i.e. ``t == clamp(t)`` (one comparison pass); backward is one
    ``where`` (a float multiply by the bool mask would add a conversion pass).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        if scale.numel() == 1 and zero_point.numel() == 1 and zero_point.device.type == "cpu":
            zp = float(zero_point)  # scalar bounds: the vectorised clamp/compare kernels
            scale = scale.reshape(())
        else:
            zp = zero_point
        lo, hi = qmin - zp, qmax - zp
        t = torch.mul(x, scale.reciprocal()).round_()  # as PyTorch: x * (1/S)
        q = t.clamp(lo, hi)
        ctx.save_for_backward(t == q)  # inside the code range: the clipped STE's mask
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_out, 0.0), None, None, None, None  # no bool->float pass


def _channel_axis(x: torch.Tensor, scale: torch.Tensor) -> int | None:
    """The one axis along which ``scale`` varies (per-channel), or None."""
    if scale.dim() != x.dim():
        return None
    axes = [d for d in range(x.dim()) if scale.shape[d] != 1]
    if len(axes) == 1 and scale.shape[axes[0]] == x.shape[axes[0]]:
        return axes[0]
    return None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """quantize -> dequantize with the clipped straight-through gradient (w.r.t. ``x``).

    Per-channel parameters run PyTorch's fused ``fake_quantize_per_channel_affine``;
    per-tensor and per-group ones the equivalent in-place autograd function (faster than
    the fused per-tensor op on CPU). Both give PyTorch's values and gradient mask exactly
    (tests/quant/test_uniform.py). No gradient flows to ``scale`` / ``zero_point``.
    """
    scale, zp = qp.scale.detach(), qp.zero_point.detach()
    if x.dtype == torch.float32 and scale.dtype == torch.float32 and scale.numel() > 1:
        axis = _channel_axis(x, scale)
        if axis is not None:
            return torch.fake_quantize_per_channel_affine(
                x, scale.flatten(), zp.flatten().to(torch.int32), axis, qp.qmin, qp.qmax
            )
    return _FakeQuantSTE.apply(x, scale, zp, qp.qmin, qp.qmax)


def reduce_range(
    x: torch.Tensor, granularity: str = "tensor", axis: int = 0, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per tensor, per channel (along ``axis``) or per group.

    Returned tensors broadcast against :func:`grouped` views of ``x`` (per-group) or against
    ``x`` itself (per-tensor, per-channel).
    """
    if granularity == "tensor":
        return torch.aminmax(x)  # one pass
    if granularity == "channel":
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        return x.amin(dim=dims).reshape(shape), x.amax(dim=dims).reshape(shape)
    if granularity == "group":
        g = grouped(x, group_size)
        return g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    raise ValueError(
        f"granularity={granularity!r} not supported; allowed: 'tensor', 'channel', 'group'"
    )


def grouped(x: torch.Tensor, group_size: int | None, name: str = "tensor",
            key: str = "group_size") -> torch.Tensor:
    """View a weight (out, in, *k) as (out, in*k / g, g): groups of ``g`` along the input dim.

    ``name`` (the layer) and ``key`` (the option, e.g. ``block_size``) go into the error."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{name}: {key} must be a positive int, got {group_size!r}")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] % group_size:
        raise ValueError(
            f"{name}: {key}={group_size} does not divide the input dimension {flat.shape[1]} "
            f"of a tensor of shape {tuple(x.shape)}"
        )
    return flat.reshape(x.shape[0], flat.shape[1] // group_size, group_size)


def fake_quantize_tensor(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "tensor",
    axis: int = 0,
    group_size: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with min-max ranges computed from ``x`` itself (weights)."""
    lo, hi = reduce_range(x.detach(), granularity, axis, group_size)
    qp = qparams_from_range(lo, hi, bits, symmetric)
    if granularity == "group":
        return fake_quantize(grouped(x, group_size), qp).reshape(x.shape)
    return fake_quantize(x, qp)


def storage_bits(
    numel: int, bits: int, n_params: int, symmetric: bool, param_bits: int = 32
) -> int:
    """Exact storage: ``bits`` per code + a scale (and zero-point if affine) per channel/group.

    Scales are stored as fp32 by default (``param_bits``); affine zero-points take ``bits``
    bits each (they are codes in [q_min, q_max]).
    """
    zp_bits = 0 if symmetric else bits
    return numel * bits + n_params * (param_bits + zp_bits)
