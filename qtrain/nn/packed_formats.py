"""Packed formats for the learned, float and sparse weight quantizers (their builders here,
their decoders and load checks in :mod:`qtrain.nn.packed_codecs`), and the packers that turn
those trained fake-quant weights into :class:`qtrain.nn.packed.PackedLinear` layers, each
registered once in :data:`qtrain.nn.packed_registry.PACKERS` with the formats it writes.

Formats (bit layout: ``qtrain_kernels/layout.py``; the first two also run on the Triton kernel):

* ``uniform`` with float ``zeros``: Polino bucketed min-max quantization (Polino et al. 2018 eq. (2)-(3):
  ``W = alpha u / (s - 1) + beta`` when the bucket size divides K, one bucket = one group;
  scales / zeros in float32 as storage_bits counts alpha and beta), dynamic fixed point
  (Das et al. 2018: symmetric, scale ``2^E``), calibrated (KL / ACIQ / ...) uniform weights.
* ``lut`` (c-bit codes, ``lut`` (1, 2^c) float32 table, ``scales`` (N, 1) all ones): DoReFa
  k-bit (Zhou et al. 2016 eq. (9): codes ``u = round((2^k - 1) t)``, table ``2 (u / (2^k - 1))
  - 1``), DSQ's hard test-time quantizer (Gong et al. 2019: table ``l + Delta u``), both tables
  computed with the forward's own float32 operations; TTQ (Zhu
  et al. 2017: table ``{-W_n, 0, W_p, 0}``, code ``t + 1``), Polino differentiable
  quantization with one bucket per tensor (``bucket_size=None``: table ``alpha p + beta``),
  scalar soft-to-hard VQ (Agustsson et al. 2017), ABC-Net's M binary weight bases (Lin et al.
  2017: the M bit planes as one M-bit code, table ``sum_i alpha_i (2 bit_i - 1)``, bit-exact),
  scalar k-means weight sharing (Gong et al. 2014 sec. 3.2; ``KMeansWeightQuantizer``: the
  fp16 shared values as a float16 table, bit-exact).
* ``float`` (torch path only, no Triton kernel): ``fweight`` (N, K) in the real torch dtype
  -- float16 / bfloat16 / float8_e4m3fn / float8_e5m2 (FloatQuantizer, FP8 training, Wang
  et al. 2018), or int16 / int32 codes for dynamic fixed point wider than 8 bits -- plus
  optional ``fscale`` (1,) float32 (``W = fweight * fscale``) or ``s2fp8`` (2,) float32
  ``(alpha, beta)``: S2FP8 (Cambier et al. 2020 sec. 3) stores ``Y^ = sign(X) FP8_E5M2(2^(alpha
  log2|X| + beta))`` and decodes ``X^ = sign(Y^) 2^((log2|Y^| - beta) / alpha)``, 0 -> 0.
* ``bucketed`` (torch path only): Polino buckets that are not groups of the rows (the bucket
  size does not divide the row length K): the flattened weight, zero-padded to whole buckets,
  as ``packed`` (n_buckets, words(bs)) codes with float32 ``scales`` / ``zeros``
  (n_buckets, 1); ``group_size`` = bs. ``W.flat[:numel] = dequantized buckets``. With a
  ``lut`` (1, 2^c) float32 buffer (Polino differentiable quantization, sec. 2.2: learned
  points shared by the buckets): ``W = lut[u] * scales + zeros`` (scales = alpha, zeros = beta
  per bucket; the padding copies the last weight).
* ``value_aware`` (torch path only; Park et al. 2018 sec. 3): the dense ``bits``-bit uniform
  part (``packed`` / ``scales`` / ``zeros``, every position) plus the outliers: ``sp_values``
  (k,) float32 and their flat indices (row-major over (N, K)) as ``ceil(log2 numel)`` bit
  planes ``sp_index`` (idx_bits, 1, ceil(k / 32)) int32 (the index width
  ``value_aware_storage_bits`` counts). ``W = dense`` with ``W.flat[idx] = values``.

* ``sparse_shared`` (torch path only; :mod:`qtrain.nn.packed_sparse`): Deep Compression's
  pruned + weight-shared layer (``SharedWeightQuantizer``) as its relative-index and code bit
  streams, fp32 codebook and metadata; bit-exact.

* ``binary`` / ``ternary`` (existing formats): XNOR-Net, DoReFa 1-bit and LAB (Hou et al.
  2017; alpha from the quantizer's curvature) through one ``_binary``; TWN's codes and alpha;
  ELQ's codes and solved alpha (:mod:`qtrain.nn.elq_quantizer`); alpha stored in fp16 per row.

Exactness (vs. the fake-quant layer in eval mode, measured in tests/test_export_more_formats.py):
bit-exact: DoReFa k-bit and DSQ (``lut``), TTQ, Polino differentiable (``lut`` /
``bucketed``), float / FP8 training / S2FP8 (``float``), dynamic fixed point, and with
``scale_dtype=float32`` (pack_model's default) calibrated, value-aware, DoReFa 1-bit, XNOR and
TWN; LAB up to one fp32 rounding of alpha (summed in another order); scalar soft-to-hard VQ up
to one fp32 rounding (its forward is ``soft + (hard - soft)``); Polino buckets ~1 ulp (float32
``(u - z) s``); with ``scale_dtype=float16`` the scales / zeros / alpha are rounded (~2^-11 of
the weight range); vector soft-to-hard VQ (``codebook``) stores fp16 centroids. Every packer checks its packed weight against the quantizer's own eval-mode output
and raises if they differ beyond that.
Simplifications: stochastic rounding has no single test-time weight; those quantizers are
packed with round-to-nearest (the grid point nearest the float weight). FP8 training's
``accumulation='chunked'`` is not modelled by the packed layer (plain fp32 GEMM).
Storage vs. ``storage_bits``: per-tensor parameters are repeated per row (the formats keep
one scale per row: 16 or 32 bits per row), 3-bit / 5..7-bit codes travel in 4- / 8-bit
containers, and vector soft-to-hard VQ stores uint8 codes and fp16 centroids.
"""

from __future__ import annotations

import torch

from qtrain.nn import elq_quantizer, packed_sparse
from qtrain.nn import polino_quantizer as polino_q
from qtrain.nn.abc_quantizer import ABCWeightQuantizer
from qtrain.nn.bucket_quantizer import BucketUniformQuantizer
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.format_quantizers import (
    BinaryWeightQuantizer,
    DynamicFixedPointQuantizer,
    FixedPointQuantizer,
    FloatQuantizer,
    S2FP8Quantizer,
    TTQQuantizer,
    TWNQuantizer,
)
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from qtrain.nn.kmeans_quantizer import KMeansWeightQuantizer
from qtrain.nn.lab_quantizer import LABWeightQuantizer
from qtrain.nn.learned_quantizers import (
    DoReFaWeightQuantizer,
    DSQQuantizer,
    SoftToHardVQ,
)
from qtrain.nn.packed import PackedLinear
from qtrain.nn.packed_codecs import FLOAT_DTYPES, index_bits
from qtrain.nn.packed_registry import PACKERS, Packer, register_packer
from qtrain.nn.packers import uniform_layer as _uniform
from qtrain.nn.polino_quantizer import PolinoDifferentiableQuantizer
from qtrain.nn.shared_weight_quantizer import SharedWeightQuantizer
from qtrain.quant import binary, fixed_point, floats, ternary
from qtrain.quant import bucketed as B
from qtrain.quant import uniform as U
from qtrain.quant import value_aware as VA
from qtrain_kernels import layout as L


# ------------------------------------------------------------------------------ formats
def lut_layer(codes: torch.Tensor, lut: torch.Tensor, bits: int, bias=None,
              backend: str = "auto"):
    """``lut`` layer from unsigned codes (N, K) in [0, 2^c) and a (1 or N, <= 2^c) table
    (padded with zeros to 2^c entries; float32 unless given float16)."""
    n, k = codes.shape
    c = L.container_bits(bits)
    dt = torch.float16 if lut.dtype == torch.float16 else torch.float32
    table = torch.zeros(lut.shape[0], 2**c, dtype=dt, device=codes.device)
    table[:, :lut.shape[1]] = lut.detach().to(dt)
    bufs = {"packed": L.pack_codes(codes.reshape(n, k).long(), c), "lut": table,
            "scales": torch.ones(n, 1, dtype=torch.float16, device=codes.device)}
    return PackedLinear._new(k, n, "lut", bits, None, True, backend, bias, **bufs)


def float_layer(values: torch.Tensor, bits: int, bias=None, backend: str = "auto",
                fscale: float | torch.Tensor | None = None, s2fp8=None):
    """``float`` layer from ``values`` (N, K) already in their storage dtype."""
    if values.dtype not in FLOAT_DTYPES or values.dim() != 2:
        raise ValueError(f"float format: values must be 2-D {FLOAT_DTYPES}, got "
                         f"{values.dtype} {tuple(values.shape)}")
    bufs = {"fweight": values.detach().contiguous()}
    if fscale is not None:
        bufs["fscale"] = torch.as_tensor(fscale, dtype=torch.float32).reshape(1)
    if s2fp8 is not None:
        bufs["s2fp8"] = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(())
                                     for v in s2fp8])
    n, k = values.shape
    return PackedLinear._new(k, n, "float", bits, None, True, backend, bias, **bufs)


def bucketed_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   n: int, k: int, bias=None, backend: str = "auto"):
    """``bucketed`` layer: codes (n_buckets, bs) of the flattened, zero-padded weight with
    float32 scale / zero-point (n_buckets, 1); ``group_size`` holds bs."""
    nb, bs = codes.shape
    bufs = {"packed": L.pack_codes(codes, L.container_bits(bits)),
            "scales": scale.reshape(nb, 1).float().contiguous(),
            "zeros": zero.reshape(nb, 1).float().contiguous()}
    return PackedLinear._new(k, n, "bucketed", bits, bs, False, backend, bias, **bufs)


# ------------------------------------------------------------------------------ packers
class _Nearest:
    """Round to nearest while packing a quantizer with ``rounding='stochastic'`` (module doc)."""

    def __init__(self, wq) -> None:
        self.wq, self.old = wq, getattr(wq, "rounding", None)

    def __enter__(self):
        if self.old == "stochastic":
            self.wq.rounding = "nearest"

    def __exit__(self, *exc):
        if self.old == "stochastic":
            self.wq.rounding = self.old


def _eval_weight(wq, w: torch.Tensor) -> torch.Tensor:
    """The quantizer's eval-mode output (what the fake-quant layer uses at test time); runs
    its lazy initialisation (TTQ scales, DSQ range, Polino points) like a first forward."""
    was = wq.training
    wq.train(False)
    try:
        out = wq(w)
    finally:
        wq.train(was)
    return out.as_subclass(torch.Tensor).detach().float().reshape(w.shape[0], -1)


def _rel_tol(scale_dtype) -> float:
    return 2e-3 if scale_dtype == torch.float16 else 1e-5


def _binary(flat, alpha, bias, backend, scale_dtype):
    """``sign(W) * alpha`` (sign(0) = +1) in the binary format: alpha per tensor (repeated per
    row) or per row, stored as ``scale_dtype`` (float32: the alpha the packer computed, which
    may differ from the forward's by an fp32 rounding, e.g. LAB; float16: 1e-3 tolerance)."""
    sign = torch.where(flat >= 0, 1.0, -1.0)
    rows = alpha.float().reshape(-1, 1).expand(flat.shape[0], 1)
    return (PackedLinear.from_binary(sign, rows, bias, backend, scale_dtype),
            1e-3 if scale_dtype == torch.float16 else 1e-6)


def _lab(wq, w, flat, bias, backend, scale_dtype):
    """LAB (Hou et al. 2017): ``alpha * sign(W)`` with the loss-aware alpha = ||d w||_1 /
    ||d||_1 of the curvature the quantizer holds."""
    return _binary(flat, wq.alpha(w), bias, backend, scale_dtype)


def _xnor(wq, w, flat, bias, backend, scale_dtype):
    """XNOR-Net (Rastegari et al. 2016): ``sign(W) * mean|W|`` per output channel."""
    return _binary(flat, binary.xnor_scale(w), bias, backend, scale_dtype)


def _twn(wq, w, flat, bias, backend, scale_dtype):
    """TWN (Li & Liu 2016): the quantizer's ternary codes and alpha (per tensor: repeated per
    row) in the ternary format, alpha stored as ``scale_dtype``."""
    _, alpha = ternary.twn_params(w, wq.per_channel, wq.delta_factor)
    rows = alpha.float().reshape(-1, 1).expand(flat.shape[0], 1)
    return (PackedLinear.from_ternary(wq.codes(w).reshape_as(flat).float(), rows, bias,
                                      backend, scale_dtype),
            1e-3 if scale_dtype == torch.float16 else 1e-6)


def _dorefa(wq, w, flat, bias, backend, scale_dtype):
    """DoReFa k-bit (eq. (9)): codes ``u = round((2^k - 1) t)`` into the ``lut`` table
    ``2 (u / (2^k - 1)) - 1`` computed with the forward's own float32 operations, so the
    packed weight is bit-exact (the ``uniform`` format's ``(u - z) s`` is not: one rounding
    off). 1 bit (eqs. (7)-(8)): ``sign(w) E|w|`` (sign(0) = +1) in the binary format."""
    if wq.bits == 1:
        return _binary(flat, w.abs().mean(), bias, backend, scale_dtype)
    n = float(2**wq.bits - 1)  # eq. (9), computed as E.dorefa_weight does
    t = torch.tanh(flat)
    t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
    u = torch.round(t * n)
    levels = 2 * (torch.arange(2**wq.bits, dtype=torch.float32) / n) - 1
    return lut_layer(u.long(), levels.reshape(1, -1), wq.bits, bias, backend), None


def _dsq(wq, w, flat, bias, backend, scale_dtype):
    """DSQ's hard test-time value ``l + Delta round((clip(x) - l) / Delta)`` (Gong et al.
    2019): codes into the ``lut`` table ``l + Delta u`` computed with the forward's float32
    operations (bit-exact)."""
    xc, delta, _ = wq._range(flat)
    u = torch.round((xc - wq.lower) / delta)
    levels = wq.lower + delta * torch.arange(2**wq.bits, dtype=torch.float32)
    return lut_layer(u.long(), levels.detach().reshape(1, -1), wq.bits, bias, backend), None


def _ttq(wq, w, flat, bias, backend, scale_dtype):
    pos, neg = ternary.ttq_masks(flat, wq.threshold)
    u = pos.long() - neg.long() + 1  # -W_n -> 0, 0 -> 1, W_p -> 2
    w_p, w_n = wq.w_p.detach(), wq.w_n.detach()
    lut = torch.stack([-w_n, torch.zeros_like(w_p), w_p, torch.zeros_like(w_p)])
    return lut_layer(u, lut.float().reshape(1, 4), 2, bias, backend), None


def _polino(wq, w, flat, bias, backend, scale_dtype):
    """Polino differentiable quantization: codes = nearest learned point of each scaled weight,
    ``alpha p + beta`` as the quantizer computes it (bit-exact)."""
    n, k = flat.shape
    s, alpha, beta = wq.scale(flat)
    codes = polino_q.nearest_points(s, wq.points)  # (n_buckets, bs), padding included
    p = wq.points.detach().float()
    if wq.bucket_size is None:  # one bucket: one table (Triton-capable lut format)
        return lut_layer(codes.reshape(n, k), (p * alpha + beta).reshape(1, -1), wq.bits, bias,
                         backend), None
    c = L.container_bits(wq.bits)
    layer = bucketed_layer(codes, alpha, beta, wq.bits, n, k, bias, backend)
    lut = torch.zeros(1, 2**c, dtype=torch.float32, device=p.device)
    lut[0, :p.numel()] = p
    layer.register_buffer("lut", lut)
    return layer, None


def _soft_to_hard(wq, w, flat, bias, backend, scale_dtype):
    if wq.bits > 8:
        raise ValueError(f"SoftToHardVQ with bits={wq.bits}: packed formats hold at most 256 "
                         "centers (bits <= 8)")
    codes = wq.sq_distances(wq.subvectors(flat)).argmin(dim=1).reshape(flat.shape[0], -1)
    c = wq.centers.detach()
    # the forward is soft + (hard - soft): the hard centre up to one fp32 rounding
    if wq.dim == 1:
        return lut_layer(codes, c.reshape(1, -1), wq.bits, bias, backend), 1e-6
    return PackedLinear.from_codebook(codes, c, bias, backend), 2e-3  # fp16 centroids


def _abc(wq, w, flat, bias, backend, scale_dtype):
    """ABC-Net (Lin et al. 2017): the M bit planes as one M-bit code per weight (bit i = base
    B_i is +1) in the ``lut`` format, the table ``sum_i alpha_i (2 bit_i - 1)`` per layer (per
    row with ``per_channel``) summed in the forward's order: bit-exact."""
    codes, table = wq.packed_codes(w)
    return lut_layer(codes, table, wq.bits, bias, backend), None


def _kmeans(wq, w, flat, bias, backend, scale_dtype):
    # the codebook holds fp16-representable values: a float16 table is exact
    codes = wq.indices.reshape(flat.shape[0], -1)
    return lut_layer(codes, wq.codebook.half().reshape(1, -1), wq.bits, bias, backend), None


def _bucket(wq, w, flat, bias, backend, scale_dtype):
    if wq.bits > 8:
        raise ValueError(f"bits={wq.bits}; packed uniform codes hold at most 8 bits")
    n, k = flat.shape
    bs = wq.bucket_size
    v = flat.reshape(-1)  # as qtrain.quant.bucketed.bucket_quantize (pad: copies of the last)
    pad = B.num_buckets(v.numel(), bs) * bs - v.numel()
    v = torch.cat([v, v[-1:].expand(pad)]).reshape(-1, bs)
    beta = v.amin(dim=1, keepdim=True)
    alpha = (v.amax(dim=1, keepdim=True) - beta).clamp_min(B._EPS)
    levels = 2**wq.bits - 1
    q = torch.round((v - beta) / alpha * levels).clamp(0, levels)
    s, z = alpha / levels, -beta / (alpha / levels)
    # float32 alpha / beta per bucket, as storage_bits counts them (and then ~exact)
    if k % bs == 0:  # buckets are groups of the rows: the uniform format (Triton kernel)
        return _uniform(q.reshape(n, k), s, z, wq.bits, False, None if bs == k else bs, k,
                        bias, backend, torch.float32), _rel_tol(torch.float32)
    return bucketed_layer(q.long(), s, z, wq.bits, n, k, bias, backend), _rel_tol(torch.float32)


def _dfp(wq, w, flat, bias, backend, scale_dtype):
    q, e = fixed_point.dfp_codes(flat, wq.bits, "nearest")
    if wq.bits > 8:  # wide fixed point: int16 / int32 codes, fp32 scale 2^E (exact)
        dt = torch.int16 if wq.bits <= 16 else torch.int32
        return float_layer(q.to(dt), 16 if wq.bits <= 16 else 32, bias, backend,
                           fscale=2.0**e), None
    sd = scale_dtype if float(torch.tensor(2.0**e).to(scale_dtype)) == 2.0**e else torch.float32
    return _uniform(q, 2.0**e, 0, wq.bits, True, None, flat.shape[1], bias, backend, sd), None


def _fixed(wq, w, flat, bias, backend, scale_dtype):
    """Gupta 2015 static <IL, FL>: WL-bit codes with the fixed scale 2^-FL (exact; WL > 8 as
    int16 / int32 codes in the float format, as the wide dynamic fixed point)."""
    q = fixed_point.fixed_codes(flat, wq.int_bits, wq.frac_bits, "nearest")
    if wq.bits > 8:
        dt = torch.int16 if wq.bits <= 16 else torch.int32
        return float_layer(q.to(dt), 16 if wq.bits <= 16 else 32, bias, backend,
                           fscale=2.0**-wq.frac_bits), None
    return _uniform(q, 2.0**-wq.frac_bits, 0, wq.bits, True, None, flat.shape[1], bias,
                    backend, torch.float32), None


def _float(wq, w, flat, bias, backend, scale_dtype, ref=None):
    dt = floats.TORCH_DTYPES.get(wq.fmt)
    if dt is None:
        raise ValueError(f"float format {wq.fmt!r} has no torch dtype to store it in; "
                         f"packable: {tuple(floats.TORCH_DTYPES)}")
    return float_layer(ref.to(dt), wq.bits, bias, backend), None


def _s2fp8(wq, w, flat, bias, backend, scale_dtype):
    alpha, beta = floats.s2fp8_stats(flat)  # as floats.s2fp8_quantize (Cambier 2020 sec. 3)
    a = flat.abs()
    nz = a > 0
    y = torch.exp2(alpha * torch.log2(torch.where(nz, a, torch.ones_like(a))) + beta)
    y_hat = floats.simulate_float(y, "e5m2", saturate=True)
    ok = nz & (y_hat > 0)
    stored = torch.where(ok, torch.copysign(y_hat, flat), torch.zeros_like(flat))
    return float_layer(stored.to(torch.float8_e5m2), 8, bias, backend,
                       s2fp8=(alpha, beta)), None


def _fp8_training(wq, w, flat, bias, backend, scale_dtype, ref=None):
    """FP8 training's weights: a plain FP8 dtype, or S2FP8 (``fmt='s2fp8'``, Cambier 2020)
    stored as E5M2 codes plus the tensor's alpha / beta."""
    if wq.fmt == "s2fp8":
        return _s2fp8(wq, w, flat, bias, backend, scale_dtype)
    return _float(wq, w, flat, bias, backend, scale_dtype, ref=ref)


def _calibrated(wq, w, flat, bias, backend, scale_dtype):
    if wq.calibrating:
        raise ValueError("still calibrating (calibrating=True); freeze() it first")
    qp = wq.qparams()  # the range the eval forward just used (copied into its buffers)
    return _uniform(U.quantize(flat, qp), qp.scale, qp.zero_point, wq.bits, wq.symmetric,
                    None, flat.shape[1], bias, backend, scale_dtype), _rel_tol(scale_dtype)


def _value_aware(wq, w, flat, bias, backend, scale_dtype):
    mask = VA.outlier_mask(flat, wq.ratio)  # as VA.value_aware_fake_quantize
    inl = flat[~mask]
    qp = U.qparams_from_range(inl.min(), inl.max(), wq.bits, wq.symmetric)
    dense = _uniform(U.quantize(flat, qp), qp.scale, qp.zero_point, wq.bits, wq.symmetric,
                     None, flat.shape[1], None, backend, scale_dtype)
    idx = mask.reshape(-1).nonzero().reshape(1, -1)
    bufs = dict(dense.named_buffers(recurse=False))
    bufs.pop("bias", None)
    bufs["sp_index"] = L.pack_bitplanes(idx, index_bits(flat.numel()))
    bufs["sp_values"] = flat.reshape(-1)[idx[0]].float().contiguous()
    n, k = flat.shape
    return PackedLinear._new(k, n, "value_aware", wq.bits, None, wq.symmetric, backend, bias,
                             **bufs), _rel_tol(scale_dtype)


def _sparse_shared(wq, w, flat, bias, backend, scale_dtype):
    """Deep Compression's :class:`~qtrain.nn.shared_weight_quantizer.SharedWeightQuantizer`
    in the ``sparse_shared`` format (:mod:`qtrain.nn.packed_sparse`): exact (the decoded
    weight is ``C[codes]`` on the mask)."""
    bufs = packed_sparse.encode(wq.mask, wq.codebook_codes, wq.centroids, wq.index_bits)
    n, k = flat.shape
    cb = int(bufs["ss_meta"][4])
    return PackedLinear._new(k, n, packed_sparse.FMT, cb, None, True, backend, bias,
                             **bufs), None


def _max_8_bits(wq) -> str | None:
    """Why ``wq``'s settings have no packed form (checked before training), else None."""
    return f"bits={wq.bits} > 8" if wq.bits > 8 else None


def _checked(m, wq, name, bias, backend, scale_dtype):
    """Layer packer of the quantizers here: :func:`pack_weight` of the layer's weight."""
    return pack_weight(m.weight, wq, name, bias, backend, scale_dtype)


for _cls, _fn, _formats, _label, _check in (
        (DoReFaWeightQuantizer, _dorefa, ("binary", "lut"), "DoReFa", None),
        (DSQQuantizer, _dsq, ("lut",), "DSQ", None),
        (TTQQuantizer, _ttq, ("lut",), "TTQ", None),
        (PolinoDifferentiableQuantizer, _polino, ("lut", "bucketed"), "Polino differentiable",
         None),
        (SoftToHardVQ, _soft_to_hard, ("lut", "codebook"), "soft-to-hard VQ", _max_8_bits),
        (BucketUniformQuantizer, _bucket, ("uniform", "bucketed"), "Polino bucketed",
         _max_8_bits),
        (DynamicFixedPointQuantizer, _dfp, ("uniform", "float"), "dynamic fixed point", None),
        (FixedPointQuantizer, _fixed, ("uniform", "float"), "fixed point (Gupta)", None),
        (FloatQuantizer, _float, ("float",), "float (fp16/bf16/fp8)", None),
        (FP8TrainingQuantizer, _fp8_training, ("float",), "FP8 training", None),
        (S2FP8Quantizer, _s2fp8, ("float",), "S2FP8", None),
        (CalibratedQuantizer, _calibrated, ("uniform",), "calibrated uniform", None),
        (ValueAwareQuantizer, _value_aware, ("value_aware",), "value-aware", None),
        (KMeansWeightQuantizer, _kmeans, ("lut",), "scalar k-means (VQ)", None),
        (LABWeightQuantizer, _lab, ("binary",), "LAB binary", None),
        (ABCWeightQuantizer, _abc, ("lut",), "ABC-Net binary bases", None),
        (TWNQuantizer, _twn, ("ternary",), "TWN ternary", None),
        (BinaryWeightQuantizer, _xnor, ("binary",), "XNOR binary", None),
        (elq_quantizer.ELQWeightQuantizer, elq_quantizer.pack, ("binary", "ternary"),
         "ELQ binary / ternary", None),
        (SharedWeightQuantizer, _sparse_shared, (packed_sparse.FMT,),
         "Deep Compression (sparse_shared)", None)):
    register_packer(Packer(_cls, _checked, _formats, _label, weight=_fn, check=_check))


@torch.no_grad()
def pack_weight(weight: torch.Tensor, wq, name: str, bias=None, backend: str = "auto",
                scale_dtype: torch.dtype = torch.float16):
    """Packed layer holding ``wq``'s eval-mode quantization of ``weight`` (module doc).

    Raises a ValueError naming the layer if the quantizer's settings have no packed form,
    or if the packed weight differs from the quantizer's own output beyond the format's
    rounding (a guard against the two computations drifting apart)."""
    fn = PACKERS[type(wq)].weight
    with _Nearest(wq):
        ref = _eval_weight(wq, weight)
        flat = weight.detach().float().reshape(weight.shape[0], -1)
        kw = {"ref": ref} if fn in (_float, _fp8_training) else {}
        try:
            packed, tol = fn(wq, weight.detach().float(), flat, bias, backend, scale_dtype,
                             **kw)
        except ValueError as e:
            raise ValueError(f"{name} ({type(wq).__name__}): {e}") from None
    got = packed.dequantize().float()
    same = (got == ref) | (got.isnan() & ref.isnan())
    if tol is None:
        ok = bool(same.all())
    else:
        lim = tol * float(ref[ref.isfinite()].abs().max()) if ref.isfinite().any() else 0.0
        ok = bool((same | ((got - ref).abs() <= lim)).all())
    if not ok:
        err = float((got - ref).abs().nan_to_num(float("inf")).max())
        raise ValueError(f"{name} ({type(wq).__name__}): packed weight differs from the "
                         f"fake-quant weight by {err:.3g} (tolerance {tol})")
    return packed
