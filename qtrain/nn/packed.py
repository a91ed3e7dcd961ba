"""Packed low-bit inference layers running on :mod:`qtrain_kernels`.

A packed layer stores only the compressed weight (layout: ``qtrain_kernels/layout.py``) and
computes ``y = x W_hat^T + b`` with

* ``backend="triton"``: the fused Triton kernel (CPU tensors run it in Triton's interpreter),
* ``backend="torch"``: pure PyTorch, ``F.linear(x, dequantize().to(x.dtype), bias)``,
* ``backend="auto"``: the kernel for CUDA inputs, torch otherwise.

Formats (``fmt``): ``uniform`` (Jacob et al. 2018; int1..8, symmetric or affine, per channel
or per group), ``ternary`` (TWN, Li & Liu 2016: Delta = 0.7 mean|w|, alpha = mean of |w|
above Delta, per output row), ``binary`` (XNOR-Net, Rastegari et al. 2016 eq. (4):
alpha = mean|w| per row, B = sign(w), sign(0) = +1), ``codebook`` (PQ / k-means: uint8 codes
into a float16 codebook; Stock et al. 2019), ``w8a8`` (per-channel int8 weights, per-token
dynamic int8 activations) and ``pow2`` (INQ power-of-two weights, Zhou et al. 2017 eq. (2)-(3):
b-bit codes, see :func:`pow2_codes`; pure-torch path only: the weight is dequantized to float
at run time, there is no Triton kernel for it), ``lut`` (c-bit codes into a float lookup
table: non-uniform scalar levels such as TTQ's {-W_n, 0, W_p}), ``float`` (the weight in a
real torch dtype: fp16 / bf16 / fp8, S2FP8, wide fixed point; torch path only) and
``value_aware`` (a dense uniform part plus sparse full-precision outliers) and ``bucketed``
(uniform codes of the flattened weight in buckets that need not align with rows); torch only.
The last three are built in :mod:`qtrain.nn.packed_formats`. ``rq`` (residual
quantization, Gong et al. 2014: per-stage uint8 codes + fp16 codebooks, one codebook-kernel
launch per stage) is built in :mod:`qtrain.nn.packed_rq`; ``sparse_shared`` (Deep Compression's
relative-index + code streams; torch only) in :mod:`qtrain.nn.packed_sparse`. A ``uniform``
weight may carry float16 / float32 ``zeros`` (non-integer zero-points, e.g. DoReFa, DSQ).
Every format's decoder, own forward (codebook, w8a8, rq) and load checks are its entry in
:data:`qtrain.nn.packed_registry.FORMATS` (:mod:`qtrain.nn.packed_codecs`).

:class:`PackedConv2d` and :class:`PackedEmbedding` store their (flattened) weight in the
same formats as a linear layer.

An optional ``act_quantizer`` (the trained fake-quant input quantizer) is applied to the
input first, so an exported model computes what the trained model computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.fake_quant import input_scale, scaled_output
from qtrain.nn.packed_codecs import pow2_values as pow2_values  # re-exported (its decoder)
from qtrain.nn.packed_registry import FORMATS
from qtrain.quant import pow2
from qtrain.quant import uniform as U
from qtrain_kernels import layout as L
from qtrain_kernels.lowbit_matmul import lowbit_linear

BACKENDS = ("auto", "triton", "torch")
SCALE_DTYPES = (torch.float16, torch.float32)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {BACKENDS}")
    return backend


def _float_weight(linear: nn.Module) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise ValueError(f"linear must have a 2-D (or conv) weight, got {type(linear).__name__}")
    return w.detach().reshape(w.shape[0], -1).float()


def pow2_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """INQ weight -> (b-bit unsigned codes, n1) (Zhou et al. 2017, eq. (2)-(4)).

    The layer's level set is P = {0} U {+-2^k : n2 <= k <= n1}, n2 = n1 + 1 - 2^(b-2)
    (:func:`qtrain.quant.pow2.inq_levels`). A value is coded as
    ``u = sign << (b - 1) | e`` with sign 1 for negative values and the exponent index
    ``e = 0`` for 0, ``e = 1 + n1 - k`` for +-2^k (so ``e`` is in [0, 2^(b-2)] and fits in
    the b - 1 low bits). The weight is first rounded to the levels exactly as
    :class:`qtrain.nn.format_quantizers.PowerOfTwoQuantizer` does in its forward.
    """
    n1, _ = pow2.inq_exponent_range(weight, bits)
    w = weight.detach()
    q = pow2.round_to_levels(w, pow2.inq_levels(w, bits)).float()
    mag = q.abs()
    e = torch.where(mag > 0, 1 + n1 - torch.log2(mag.clamp_min(2.0**-126)).round().long(), 0)
    u = torch.where(q < 0, 2 ** (bits - 1), 0) | e
    return u.reshape(w.shape[0], -1).to(torch.int64), n1


class PackedLinear(nn.Module):
    """Linear layer with packed weights; build it with one of the ``from_*`` constructors."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bits: int,
                 group_size: int | None = None, symmetric: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"fmt={fmt!r}; allowed: {tuple(FORMATS)}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.bits, self.group_size, self.symmetric = fmt, bits, group_size, symmetric
        self.backend = _check_backend(backend)
        self.act_quantizer: nn.Module | None = None
        self.source: dict | None = None  # what it was packed from (qtrain.export metadata)
        self.register_buffer("bias", None)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def _new(cls, k, n, fmt, bits, group_size, symmetric, backend, bias, **buffers):
        m = cls(k, n, fmt, bits, group_size, symmetric, backend)
        for name, t in buffers.items():
            m.register_buffer(name, t)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_qparams(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     bits: int, symmetric: bool, group_size: int | None, in_features: int,
                     bias: torch.Tensor | None = None, backend: str = "auto",
                     scale_dtype: torch.dtype = torch.float16) -> PackedLinear:
        """From integer codes ``(N, K)`` (signed if symmetric) and scale / zero-point
        broadcastable to ``(N, K // G, 1)`` or ``(N, 1)`` -- ``UniformQuantizer.export_qparams``.

        An affine zero-point that is not an integer in [0, 255] (DoReFa's (2^k - 1) / 2, a
        min-max offset) is stored as ``scale_dtype`` float ``zeros`` (layout doc)."""
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype}; allowed: {SCALE_DTYPES}")
        n = codes.shape[0]
        k = in_features
        g = L.check_groups(k, group_size)
        codes = codes.reshape(n, k).to(torch.int64)
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        zp = torch.as_tensor(zero_point).reshape(-1).float()
        int_zero = bool(((zp == zp.round()) & (zp >= 0) & (zp <= 255)).all())
        ng = k // g
        scale = scale.expand(n * ng) if scale.numel() == 1 else scale
        zp = zp.expand(n * ng) if zp.numel() == 1 else zp
        if scale.numel() != n * ng:
            raise ValueError(f"scale has {scale.numel()} entries; expected 1 or {n * ng}")
        c = L.container_bits(bits)
        if symmetric:
            off = 2 ** (bits - 1)
            u, zeros = codes + off, None
        else:
            u = codes
            zeros = zp.reshape(n, ng).to(torch.uint8 if int_zero else scale_dtype).contiguous()
        bufs = {"packed": L.pack_codes(u, c), "scales": scale.reshape(n, ng).to(scale_dtype).contiguous()}
        if zeros is not None:
            bufs["zeros"] = zeros
        return cls._new(k, n, "uniform", bits, group_size, symmetric, backend, bias, **bufs)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int | None = 128,
                    symmetric: bool = False, backend: str = "auto",
                    scale_dtype: torch.dtype = torch.float16) -> PackedLinear:
        """Min-max uniform quantization of ``linear.weight`` (per group, or per channel if
        ``group_size`` is None), Jacob et al. 2018 eq. (1) via :mod:`qtrain.quant.uniform`."""
        w = _float_weight(linear)
        k = w.shape[1]
        g = L.check_groups(k, group_size)
        lo, hi = U.reduce_range(w, "group", group_size=g)
        qp = U.qparams_from_range(lo, hi, bits, symmetric)
        codes = U.quantize(U.grouped(w, g), qp).reshape(w.shape)
        return cls.from_qparams(codes, qp.scale, qp.zero_point, bits, symmetric, group_size, k,
                                getattr(linear, "bias", None), backend, scale_dtype)

    @classmethod
    def from_linear_ternary(cls, linear: nn.Module, backend: str = "auto") -> PackedLinear:
        """TWN (Li & Liu 2016, eq. (9)-(10)) per output row: Delta = 0.7 mean|w|."""
        w = _float_weight(linear)
        delta = 0.7 * w.abs().mean(dim=1, keepdim=True)
        keep = w.abs() > delta
        alpha = (w.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        t = torch.sign(w) * keep
        return cls.from_ternary(t, alpha, getattr(linear, "bias", None), backend)

    @classmethod
    def from_ternary(cls, t: torch.Tensor, alpha: torch.Tensor, bias=None,
                     backend: str = "auto",
                     scale_dtype: torch.dtype = torch.float16) -> PackedLinear:
        """From ternary values ``t`` in {-1, 0, 1} (N, K) and alpha (N, 1) or (N, K // G),
        alpha stored as ``scale_dtype`` (float32: the trained alpha exactly)."""
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype}; allowed: {SCALE_DTYPES}")
        n, k = t.shape
        alpha = alpha.reshape(n, -1).float()
        if not torch.isin(t, torch.tensor([-1.0, 0.0, 1.0], device=t.device)).all():
            raise ValueError("t must hold only -1, 0, +1")
        bufs = {"packed": L.pack_codes((t + 1).long(), 2), "scales": alpha.to(scale_dtype)}
        g = k // alpha.shape[1] if alpha.shape[1] > 1 else None
        return cls._new(k, n, "ternary", 2, g, True, backend, bias, **bufs)

    @classmethod
    def from_linear_binary(cls, linear: nn.Module, backend: str = "auto") -> PackedLinear:
        """XNOR-Net weights: B = sign(w) (0 -> +1), alpha = mean|w| per output row."""
        w = _float_weight(linear)
        alpha = w.abs().mean(dim=1, keepdim=True)
        sign = torch.where(w >= 0, 1.0, -1.0)
        return cls.from_binary(sign, alpha, getattr(linear, "bias", None), backend)

    @classmethod
    def from_binary(cls, sign: torch.Tensor, alpha: torch.Tensor, bias=None,
                    backend: str = "auto",
                    scale_dtype: torch.dtype = torch.float16) -> PackedLinear:
        """From signs (N, K) in {-1, +1} and alpha (N, 1) or (N, K // G), alpha stored as
        ``scale_dtype`` (float32: the trained alpha exactly)."""
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype}; allowed: {SCALE_DTYPES}")
        n, k = sign.shape
        if not ((sign == 1) | (sign == -1)).all():
            raise ValueError("sign must hold only -1, +1")
        alpha = alpha.reshape(n, -1).float()
        bufs = {"packed": L.pack_codes(((sign + 1) // 2).long(), 1),
                "scales": alpha.to(scale_dtype)}
        g = k // alpha.shape[1] if alpha.shape[1] > 1 else None
        return cls._new(k, n, "binary", 1, g, True, backend, bias, **bufs)

    @classmethod
    def from_codebook(cls, codes: torch.Tensor, centroids: torch.Tensor, bias=None,
                      backend: str = "auto") -> PackedLinear:
        """``codes`` (N, K / bs) in [0, n_centroids), ``centroids`` (n_centroids <= 256, bs)
        or one codebook per column segment (K / bs, n_centroids <= 256, bs) (Gong et al. 2014
        sec. 3.3; code j of a row indexes ``centroids[j]``; torch path only)."""
        if centroids.dim() not in (2, 3) or centroids.shape[-2] > 256 or (
                centroids.dim() == 3 and centroids.shape[0] != codes.shape[-1]):
            raise ValueError(f"centroids must be (n_centroids <= 256, bs) or (K / bs = "
                             f"{codes.shape[-1]}, n_centroids <= 256, bs), got "
                             f"{tuple(centroids.shape)}")
        if codes.dim() != 2 or int(codes.min()) < 0 or int(codes.max()) >= centroids.shape[-2]:
            raise ValueError(f"codes must be 2-D with values in [0, {centroids.shape[-2] - 1}]")
        n, kc = codes.shape
        bs = centroids.shape[-1]
        bufs = {"codes": codes.to(torch.uint8), "centroids": centroids.detach().half()}
        return cls._new(kc * bs, n, "codebook", 8, bs, True, backend, bias, **bufs)

    @classmethod
    def from_linear_w8a8(cls, linear: nn.Module, backend: str = "auto") -> PackedLinear:
        """Symmetric per-channel int8 weights (q in [-127, 127]); activations at run time."""
        w = _float_weight(linear)
        s = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8)
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        return cls._new(w.shape[1], w.shape[0], "w8a8", 8, None, True, backend,
                        getattr(linear, "bias", None), qweight=q, wscale=s.float())

    @classmethod
    def from_pow2(cls, weight: torch.Tensor, bits: int, bias=None,
                  backend: str = "auto") -> PackedLinear:
        """INQ / power-of-two weight (Zhou et al. 2017) as exactly ``bits`` bits per weight.

        Codes (:func:`pow2_codes`) of the whole flattened weight are stored as ``bits`` bit
        planes (``qtrain_kernels.layout.pack_bitplanes`` of one row, so padding is < 32 bits
        per plane) in ``planes`` (bits, 1, ceil(numel / 32)) int32, plus ``n1`` (1,) int8.
        Inference dequantizes to a float weight (pure torch; no Triton kernel).
        """
        w = weight.detach()
        if w.dim() < 2:
            raise ValueError(f"from_pow2: weight must be 2-D (or conv), got {tuple(w.shape)}")
        codes, n1 = pow2_codes(w, bits)
        if not -128 <= n1 <= 127:
            raise ValueError(f"from_pow2: exponent n1={n1} does not fit in int8")
        n, k = codes.shape
        bufs = {"planes": L.pack_bitplanes(codes.reshape(1, -1), bits),
                "n1": torch.tensor([n1], dtype=torch.int8)}
        return cls._new(k, n, "pow2", bits, None, True, backend, bias, **bufs)

    # ---------------------------------------------------------------- math
    def _uniform_args(self) -> dict:
        if self.fmt == "lut":
            return {"mode": "lut", "lut": self.lut}
        if self.fmt == "binary":
            return {"mode": "binary", "zero": 0.0}
        if self.fmt == "ternary":
            return {"mode": "affine", "zero": 1.0}
        return {"mode": "affine", "zero": float(2 ** (self.bits - 1)) if self.symmetric else 0.0}

    def dequantize(self) -> torch.Tensor:
        """The reference float32 weight ``(out_features, in_features)``."""
        own = FORMATS[self.fmt].dequantize
        if own is not None:
            return own(self)
        return L.dequantize_uniform(self.packed, self.scales, getattr(self, "zeros", None),
                                    L.container_bits(self.bits), self.in_features,
                                    **self._uniform_args())

    def pow2_codes(self) -> torch.Tensor:
        """The (out, in) unsigned codes of a ``pow2`` layer (unpacked bit planes)."""
        n, k = self.out_features, self.in_features
        return L.unpack_bitplanes(self.planes, n * k).reshape(n, k)

    def storage_bits(self) -> int:
        """Exact bits of everything this layer stores (codes, scales, zeros, codebook, bias)."""
        return sum(b.numel() * b.element_size() * 8 for b in self.buffers(recurse=False))

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if FORMATS[self.fmt].torch_only:
            return False
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        own = FORMATS[self.fmt].linear  # codebook, w8a8, rq
        if own is not None:
            return own(self, x, bias, self._use_kernel(x))
        if self._use_kernel(x):
            return lowbit_linear(x, self.packed, self.scales, getattr(self, "zeros", None), bias,
                                 bits=L.container_bits(self.bits), k=self.in_features,
                                 **self._uniform_args())
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features; this layer expects {self.in_features}")
        k = None
        if self.act_quantizer is not None:
            k = input_scale(self.act_quantizer, x)  # XNOR-Net's K (qtrain.nn.fake_quant)
            x = self.act_quantizer(x)
        if k is not None:
            bias, self.bias = self.bias, None
            try:
                y = self._linear(x)
            finally:
                self.bias = bias
            return scaled_output(y, k, None if bias is None else bias.to(y.dtype), -1)
        return self._linear(x)

    def spec(self) -> dict:
        """Constructor arguments (stored in a packed file's metadata)."""
        return {"kind": "linear", "in_features": self.in_features,
                "out_features": self.out_features, "fmt": self.fmt, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "has_zeros": hasattr(self, "zeros"), "has_bias": self.bias is not None,
                **{k: f(self) for k, f in FORMATS[self.fmt].spec.items()},
                **({"source": self.source} if self.source is not None else {})}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.fmt}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, backend={self.backend}")

    @classmethod
    def _same_packing(cls, lin: PackedLinear):
        """A ``cls`` with ``lin``'s format and its packed buffers (shared, not copied)."""
        new = cls(lin.in_features, lin.out_features, lin.fmt, lin.bits, lin.group_size,
                  lin.symmetric, lin.backend)
        for name, b in lin.named_buffers(recurse=False):
            new.register_buffer(name, b)
        return new


class PackedConv2d(PackedLinear):
    """Conv2d whose flattened weight ``(out, in/groups * kh * kw)`` is packed like a linear.

    Only the torch backend exists for convolutions (dequantize, then ``F.conv2d``); the
    point is the true on-disk size and exact outputs after export.
    """

    conv_args: dict

    @classmethod
    def wrap(cls, lin: PackedLinear, conv: nn.Conv2d) -> PackedConv2d:
        new = cls._same_packing(lin)
        new.conv_args = {"weight_shape": list(conv.weight.shape), "stride": list(conv.stride),
                         "padding": list(conv.padding) if not isinstance(conv.padding, str)
                         else conv.padding, "dilation": list(conv.dilation),
                         "groups": conv.groups}
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        pad = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        k = None
        if self.act_quantizer is not None:  # XNOR-Net's K (qtrain.nn.fake_quant)
            k = input_scale(self.act_quantizer, x, {
                "kernel_size": tuple(a["weight_shape"][2:]), "stride": tuple(a["stride"]),
                "padding": pad, "dilation": tuple(a["dilation"]), "groups": a["groups"],
                "out_channels": a["weight_shape"][0]})
            x = self.act_quantizer(x)
        w = self.dequantize().reshape(a["weight_shape"]).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if k is not None:
            y = F.conv2d(x, w, None, tuple(a["stride"]), pad, tuple(a["dilation"]), a["groups"])
            return scaled_output(y, k, bias, 1)
        return F.conv2d(x, w, bias, tuple(a["stride"]), pad, tuple(a["dilation"]), a["groups"])

    def spec(self) -> dict:
        return {**super().spec(), "kind": "conv2d", **self.conv_args}


class PackedEmbedding(PackedLinear):
    """Embedding table ``(num_embeddings, embedding_dim)`` stored in a packed linear format
    (the table's rows are the "output channels": ``out_features = num_embeddings``,
    ``in_features = embedding_dim``), so it uses the uniform / codebook layouts unchanged.

    Only the torch path exists: the table is dequantized and looked up with ``F.embedding``
    (padding_idx / max_norm as the float layer). It takes indices, so no act_quantizer.
    """

    emb_args: dict

    @classmethod
    def wrap(cls, lin: PackedLinear, emb: nn.Embedding) -> PackedEmbedding:
        new = cls._same_packing(lin)
        new.emb_args = {"padding_idx": emb.padding_idx, "max_norm": emb.max_norm,
                        "norm_type": emb.norm_type}
        return new

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        a = self.emb_args
        return F.embedding(idx, self.dequantize(), a["padding_idx"], a["max_norm"],
                           a["norm_type"])

    def spec(self) -> dict:
        return {**super().spec(), "kind": "embedding", **self.emb_args}
