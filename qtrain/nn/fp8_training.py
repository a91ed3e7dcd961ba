"""Simulated FP8 training (Wang et al. 2018, "Training Deep Neural Networks with 8-bit
Floating Point Numbers", NeurIPS), on any device (CPU included), with the FP8 formats of
:mod:`qtrain.quant.floats`.

* :class:`FP8TrainingQuantizer`: a quantizer for the weight and activation slots of the
  fake-quant layers (``QATCallback(weight=..., act=..., bits=8)``). Wang 2018 (sec. 3,
  Fig. 1) give all three GEMMs of a layer FP8 operands and FP16 (chunk-accumulated)
  outputs: forward Y = X_8 W_8; backward dX = dY_8 W_8 and dW = dY_8^T X_8, where dY_8 is
  the *error* (the gradient of the layer's output) in FP8 (1, 5, 2) = E5M2. Here: in the
  forward the weight and the input are rounded to ``fmt``; in the backward the layer
  rounds the error entering both backward GEMMs to ``grad_fmt`` (E5M2):
  ``grad_at='error'`` (default; the fake-quant layer calls :meth:`quantize_output_grad` on
  its output, act slot first, once per layer). The GEMM outputs dX, dW are not rounded to
  FP8 (FP16 with chunked accumulation, else FP32). ``grad_at='gemm_outputs'`` is the old
  behaviour kept as an option: the error stays float and the backward GEMM *outputs*
  (the weight gradient in the weight slot, the input error in the act slot) are rounded to
  E5M2 instead. Errors smaller than E5M2's smallest subnormal (2^-16) flush to zero: use
  loss scaling (Wang use a constant 1000 for some nets; ``LossScaleMonitor`` + Lightning's
  GradScaler for dynamic scaling).
* :func:`chunked_matmul`: chunk-based accumulation (Wang 2018 sec. 3.1, Fig. 2): the dot
  products of a GEMM are split into chunks of ``chunk`` (CL = 64) terms; terms are added
  inside a chunk in ``acc_dtype`` (FP16), and the chunk sums are added to the running result
  in FP16. This avoids "swamping" (a small addend lost against a large sum) that makes long
  FP16 sequential accumulations fail. It is the exact *numerical reference*: every product
  and every partial sum is rounded to ``acc_dtype`` exactly as FP16 hardware would (IEEE
  round-to-nearest-even, computed through float64); slow, no autograd, for studying
  accuracy. :func:`sequential_matmul` (one chunk of length K) is the naive FP16 accumulation.
* Chunked accumulation *inside the layers* (``FP8TrainingQuantizer(accumulation='chunked')``,
  ``conf/quant/fp8_training.yaml``): the quantizer's output is a :class:`ChunkedAccumulation`
  view, so the ``F.linear`` / ``F.conv2d`` of QuantLinear / QuantConv2d runs
  :func:`chunked_linear` / :func:`chunked_conv2d` (conv as im2col + GEMM): the forward GEMM
  and both backward GEMMs (error, weight gradient) accumulate chunk by chunk with the
  running sum in FP16, as Wang 2018 do for all three GEMMs. Simplified (see
  :func:`chunked_gemm`): the terms inside a chunk are summed in FP32 and rounded once to FP16
  (the chunk-level swamping is modelled, the intra-chunk FP16 roundings are not); bias add,
  bias gradient and the conv input-gradient overlap-add are FP32.

Simplifications: the paper's FP16 master-weight updates with stochastic rounding are not
simulated here (weights stay FP32 masters, as in Micikevicius 2018 mixed precision);
with ``accumulation='fp32'`` (the default) the layers' matmuls accumulate in FP32.

S2FP8 (Cambier et al. 2020, "Shifted and Squeezed 8-bit Floating Point Format for
Low-Precision Training of Deep Neural Networks", ICLR; ``fmt='s2fp8'`` / ``grad_fmt='s2fp8'``,
``conf/quant/s2fp8_training.yaml``): every tensor X is stored as E5M2 numbers Y with two
per-tensor statistics, log2|Y| = alpha log2|X| + beta (eq. 1), where over the non-zero entries
mu = mean log2|X|, m = max log2|X| (eq. 3) and alpha = 15 / (m - mu), beta = -alpha mu (eq. 4):
Y has log-magnitudes of mean 0 and maximum 15 and fills E5M2's range; X^ =
(2^-beta FP8_RNE(Y))^(1/alpha) (eq. 5; :func:`qtrain.quant.floats.s2fp8_quantize`). The
statistics are recomputed from each tensor every time it is truncated (weights, layer inputs,
errors, GEMM outputs alike). Sec. 4.1: the truncation is applied "before and after every
convolution and matrix-matrix product, during both the forward and backward passes", with
round-to-nearest-even, FP32 accumulation, FP32 master weights, no loss scaling and no layer
kept in FP32. Here: before = the weight and the input (forward) and the error (backward,
``grad_at='error_and_outputs'``); after = the layer output (``round_output=True``) and the
backward GEMM outputs dX, dW (``grad_at='error_and_outputs'``). Simplification: the layer
output is truncated after the bias add (F.linear / F.conv2d add it inside the GEMM call).
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant.floats import default_saturate, get_format, s2fp8_quantize, simulate_float
from qtrain.quant.rounding import check_rounding

FP8_FORMATS = ("e4m3", "e5m2", "s2fp8")
ACCUMULATIONS = ("fp32", "chunked")
GRAD_AT = ("error", "gemm_outputs", "error_and_outputs")
ACC_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to_format(x: torch.Tensor, fmt: str, saturate: bool | None, rounding: str,
              gen: torch.Generator | None) -> torch.Tensor:
    """``x`` rounded to ``fmt`` (an FP8 format, or S2FP8 with the statistics of ``x`` itself;
    S2FP8 has no overflow, ``saturate`` does not apply to it), returned in ``x``'s dtype."""
    if fmt == "s2fp8":
        return s2fp8_quantize(x, rounding, gen).to(x.dtype)
    f = get_format(fmt)
    sat = default_saturate(f) if saturate is None else saturate
    return simulate_float(x, f, sat, rounding, gen).to(x.dtype)


def _inside(x: torch.Tensor, fmt: str, saturate: bool | None) -> torch.Tensor | None:
    """Where the clipped STE passes the gradient (None: everywhere; S2FP8 never clips)."""
    if fmt == "s2fp8":
        return None
    f = get_format(fmt)
    sat = default_saturate(f) if saturate is None else saturate
    return x.abs() <= f.max_value if sat else None


class _FP8TrainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, saturate, rounding, grad_fmt, grad_saturate, grad_rounding, gen, ggen):
        ctx.save_for_backward(_inside(x, fmt, saturate))
        ctx.grad_args = (grad_fmt, grad_saturate, grad_rounding, ggen)
        return to_format(x, fmt, saturate, rounding, gen)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        if inside is not None:  # clipped STE where the forward saturated
            g = g * inside
        fmt, sat, rounding, gen = ctx.grad_args
        if fmt is not None:  # grad_at='gemm_outputs' / 'error_and_outputs': this GEMM output
            g = to_format(g, fmt, sat, rounding, gen)
        return g, None, None, None, None, None, None, None, None


class _FP8ErrorFn(torch.autograd.Function):
    """The layer output: forward value unchanged, or rounded to ``out_fmt`` (straight-through;
    S2FP8's truncation after the GEMM); its gradient (the layer's error) rounded to ``fmt``
    in the backward (None: left float)."""

    @staticmethod
    def forward(ctx, y, fmt, sat, rounding, gen, out_fmt=None, out_sat=None, out_rounding="nearest",
                out_gen=None):
        ctx.args = (fmt, sat, rounding, gen)
        if out_fmt is None:
            return y.view_as(y)
        return to_format(y, out_fmt, out_sat, out_rounding, out_gen)

    @staticmethod
    def backward(ctx, g):
        fmt, sat, rounding, gen = ctx.args
        if fmt is not None:
            g = to_format(g, fmt, sat, rounding, gen)
        return g, None, None, None, None, None, None, None, None


class FP8TrainingQuantizer(Quantizer):
    """FP8 forward value and FP8 backward gradient (Wang 2018; see module docstring).

    Args:
        bits: 8.
        fmt: forward format, 'e5m2' (Wang 2018), 'e4m3' or 's2fp8' (Cambier 2020: E5M2 with
            per-tensor squeeze alpha and shift beta; module docstring).
        grad_fmt: gradient format, 'e5m2' (default), 'e4m3' or 's2fp8'.
        saturate / grad_saturate: overflow behaviour (None: as the torch cast; e5m2 then
            overflows to inf, which GradScaler detects and skips).
        rounding / grad_rounding: 'nearest' | 'stochastic' | 'truncate'.
        seed: generator seed for stochastic rounding (None: global RNG).
        accumulation: 'fp32' (the layer's GEMM accumulates in FP32) or 'chunked' (the
            Linear/Conv2d GEMM this tensor enters uses :func:`chunked_linear` /
            :func:`chunked_conv2d`: Wang 2018 chunk-based ``acc_dtype`` accumulation, forward
            and backward). Set it on the weight quantizer (either slot works).
        chunk_size: CL, terms per chunk (Wang 2018: 64).
        acc_dtype: 'fp16' (Wang 2018) or 'bf16': the accumulator format.
        grad_at: 'error' (Wang 2018: the error entering both backward GEMMs is FP8),
            'gemm_outputs' (the old behaviour: the backward GEMM outputs are rounded) or
            'error_and_outputs' (both: Cambier 2020 sec. 4.1 truncates before and after
            every GEMM of the backward pass).
        round_output: also round the layer's output (the forward GEMM's result) to ``fmt``
            with ``rounding`` (Cambier 2020: truncation after every GEMM; set it on the act
            slot, which the layer asks first). Default False (Wang 2018: FP16 outputs).
    Storage: 8 bits per element (S2FP8: + fp32 alpha and beta per tensor).
    """

    min_bits = max_bits = 8

    def __init__(self, bits: int = 8, fmt: str = "e5m2", grad_fmt: str = "e5m2",
                 saturate: bool | None = None, grad_saturate: bool | None = None,
                 rounding: str = "nearest", grad_rounding: str = "nearest",
                 seed: int | None = None, accumulation: str = "fp32", chunk_size: int = 64,
                 acc_dtype: str = "fp16", grad_at: str = "error",
                 round_output: bool = False) -> None:
        super().__init__(bits)
        if grad_at not in GRAD_AT:
            raise ConfigError(f"FP8TrainingQuantizer: grad_at={grad_at!r}; allowed: {GRAD_AT}")
        self.grad_at, self.round_output = grad_at, bool(round_output)
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"FP8TrainingQuantizer: accumulation={accumulation!r}; "
                             f"allowed: {ACCUMULATIONS}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"FP8TrainingQuantizer: chunk_size={chunk_size!r}; must be an int >= 1")
        if acc_dtype not in ACC_FORMATS:
            raise ValueError(f"FP8TrainingQuantizer: acc_dtype={acc_dtype!r}; "
                             f"allowed: {tuple(ACC_FORMATS)}")
        self.accumulation, self.chunk_size, self.acc_dtype = accumulation, chunk_size, acc_dtype
        for key, val in (("fmt", fmt), ("grad_fmt", grad_fmt)):
            if val not in FP8_FORMATS:
                raise ValueError(f"FP8TrainingQuantizer: {key}={val!r}; allowed: {FP8_FORMATS}")
        check_rounding(rounding, "FP8TrainingQuantizer rounding")
        check_rounding(grad_rounding, "FP8TrainingQuantizer grad_rounding")
        self.fmt, self.grad_fmt = fmt, grad_fmt
        self.saturate, self.grad_saturate = saturate, grad_saturate
        self.rounding, self.grad_rounding, self.seed = rounding, grad_rounding, seed
        self._gens: dict[str, torch.Generator] = {}

    def _gen(self, device, which: str, rounding: str) -> torch.Generator | None:
        if rounding != "stochastic" or self.seed is None:
            return None
        key = f"{which}:{device}"
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(
                self.seed + (which == "grad"))
        return self._gens[key]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        gemm_out = self.grad_at in ("gemm_outputs", "error_and_outputs")
        y = _FP8TrainFn.apply(
            x, self.fmt, self.saturate, self.rounding, self.grad_fmt if gemm_out else None,
            self.grad_saturate, self.grad_rounding, self._gen(x.device, "fwd", self.rounding),
            self._gen(x.device, "grad", self.grad_rounding))
        if self.accumulation == "chunked":
            y = ChunkedAccumulation.wrap(y, self.chunk_size, ACC_FORMATS[self.acc_dtype])
        return y

    def quantize_output_grad(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output ``y``, rounded to ``fmt`` when ``round_output``; its gradient
        (the error entering both backward GEMMs) rounded to ``grad_fmt`` when ``grad_at`` is
        'error' or 'error_and_outputs'. Identity when disabled."""
        err = self.grad_at in ("error", "error_and_outputs")
        if not self.enabled or not (err or self.round_output):
            return y
        out = (self.fmt, self.saturate, self.rounding, self._gen(y.device, "fwd", self.rounding)
               ) if self.round_output else (None, None, "nearest", None)
        return _FP8ErrorFn.apply(y, self.grad_fmt if err else None, self.grad_saturate,
                                 self.grad_rounding,
                                 self._gen(y.device, "grad", self.grad_rounding), *out)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return 8 * weight.numel() + (64 if self.fmt == "s2fp8" else 0)

    def extra_repr(self) -> str:
        acc = (f", accumulation=chunked({self.chunk_size}, {self.acc_dtype})"
               if self.accumulation == "chunked" else "")
        return (f"fmt={self.fmt}, grad_fmt={self.grad_fmt}, grad_at={self.grad_at}, "
                f"rounding={self.rounding}, grad_rounding={self.grad_rounding}{acc}, "
                f"round_output={self.round_output}, "
                f"enabled={self.enabled}")


ACC_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).double()


def chunked_matmul(a: torch.Tensor, b: torch.Tensor, chunk: int = 64,
                   acc_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``a @ b`` (a: (M, K), b: (K, N)) with Wang 2018 chunk-based ``acc_dtype`` accumulation.

    Products a_mk b_kn are rounded to ``acc_dtype``; inside each chunk of ``chunk``
    consecutive k they are summed sequentially with a rounding to ``acc_dtype`` after every
    add; the chunk sums are then summed sequentially with a rounding after every add.
    Returns ``acc_dtype`` values as a float32 tensor (M, N). No autograd (a simulation).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"chunked_matmul: need a (M, K) and b (K, N), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_matmul: chunk={chunk!r}; must be an int >= 1")
    if acc_dtype not in ACC_DTYPES:
        raise ValueError(f"chunked_matmul: acc_dtype={acc_dtype}; allowed: {ACC_DTYPES}")
    m, k = a.shape
    n = b.shape[1]
    chunk = min(chunk, k)
    nc = -(-k // chunk)
    pad = nc * chunk - k
    with torch.no_grad():
        a64, b64 = a.detach().double(), b.detach().double()
        if pad:  # zero terms leave every partial sum unchanged
            a64 = torch.cat([a64, a64.new_zeros(m, pad)], 1)
            b64 = torch.cat([b64, b64.new_zeros(pad, n)], 0)
        av = a64.reshape(m, nc, chunk)
        bv = b64.reshape(nc, chunk, n)
        part = a64.new_zeros(nc, m, n)
        for j in range(chunk):  # all chunks in parallel, position j of each
            prod = _round(torch.einsum("mc,cn->cmn", av[:, :, j], bv[:, j, :]), acc_dtype)
            part = _round(part + prod, acc_dtype)
        acc = a64.new_zeros(m, n)
        for c in range(nc):
            acc = _round(acc + part[c], acc_dtype)
    return acc.float()


def sequential_matmul(a: torch.Tensor, b: torch.Tensor,
                      acc_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Naive accumulation: one running ``acc_dtype`` sum over all K terms (chunk = K)."""
    return chunked_matmul(a, b, chunk=a.shape[1], acc_dtype=acc_dtype)


# --------------------------------------------------------------------------------------
# Chunk-based accumulation inside the layers' GEMMs (fast simulation, autograd)
# --------------------------------------------------------------------------------------


def chunked_gemm(a: torch.Tensor, b: torch.Tensor, chunk: int = 64,
                 acc_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``a @ b`` (a: (..., P, K), b: (..., K, Q), batch dims broadcast as in ``torch.matmul``)
    with chunk-based ``acc_dtype`` accumulation over K: the layer-speed simulation of Wang
    2018 sec. 3.1.

    What is simulated: K is split into consecutive chunks of ``chunk`` terms (the last one
    shorter when ``chunk`` does not divide K); each chunk's partial dot product is rounded to
    ``acc_dtype``; the partials are added to the running sum in order, in ``acc_dtype``
    (each add correctly rounded: CPU/GPU half adds compute in FP32 and round once, and FP32
    has 24 >= 2p + 2 significand bits for p = 11 (fp16) or 8 (bf16), so the double rounding
    is innocuous, Figueroa 1995). Simplified: the terms *inside* a chunk are summed by an
    FP32 matmul and rounded once, not with an ``acc_dtype`` rounding after every add as in
    :func:`chunked_matmul` (products of FP8 operands are exact in FP32 and a 64-term FP32
    sum is far more accurate than FP16, so only the chunk-level swamping is modelled).
    The chunks are views of the operands (no padding copies). Returns float32
    holding ``acc_dtype`` values. No autograd (see :func:`chunked_linear`).
    """
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"chunked_gemm: need a (..., P, K) and b (..., K, Q), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_gemm: chunk={chunk!r}; must be an int >= 1")
    if acc_dtype not in ACC_FORMATS.values():
        raise ValueError(f"chunked_gemm: acc_dtype={acc_dtype}; "
                         f"allowed: {tuple(ACC_FORMATS.values())}")
    a, b = a.float(), b.float()
    k = a.shape[-1]
    if a.dim() == 2 and b.dim() == 2:  # all full chunks in one bmm of strided views
        nf = k // chunk
        kf = nf * chunk
        acc = None
        if nf:
            av = a[:, :kf].unflatten(-1, (nf, chunk)).transpose(0, 1)  # (nf, P, chunk)
            bv = b[:kf].unflatten(0, (nf, chunk))  # (nf, chunk, Q)
            parts = torch.bmm(av, bv).to(acc_dtype)
            acc = parts[0].clone()
            for c in range(1, nf):  # sequential over chunks: the hardware accumulator's order
                acc.add_(parts[c])
        if kf < k:
            tail = (a[:, kf:] @ b[kf:]).to(acc_dtype)
            acc = tail if acc is None else acc.add_(tail)
        return acc.float()
    # batched operands: one (b)mm of views per chunk, into reused buffers (fresh large CPU
    # allocations cost more than the fp32 <-> fp16 conversions themselves)
    out = _matmul(a[..., :chunk], b[..., :chunk, :])
    if k <= chunk:
        return out.copy_(out.to(acc_dtype))
    acc, part = out.to(acc_dtype), torch.empty(out.shape, dtype=acc_dtype, device=out.device)
    for s in range(chunk, k, chunk):
        _matmul(a[..., s:s + chunk], b[..., s:s + chunk, :], out=out)
        acc.add_(part.copy_(out))  # round the chunk sum, then the running sum
    return out.copy_(acc)


def _matmul(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.matmul, but (P, K) @ (B, K, Q) as a bmm with the small operand expanded, so the
    result is made in its (B, P, Q) layout (matmul would fold B into the rows and copy)."""
    if x.dim() == 2 and y.dim() == 3:
        return torch.bmm(x.expand(y.shape[0], *x.shape), y, out=out)
    return torch.matmul(x, y, out=out)


class _ChunkedLinearFn(torch.autograd.Function):
    """The three GEMMs of a linear layer, each chunk-accumulated (Wang 2018 use chunk-based
    accumulation in the forward, backward-error and weight-gradient GEMMs)."""

    @staticmethod
    def forward(ctx, x, w, chunk, acc):  # x (M, K), w (N, K)
        ctx.save_for_backward(x, w)
        ctx.cfg = (chunk, acc)
        return chunked_gemm(x, w.t(), chunk, acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g (M, N)
        x, w = ctx.saved_tensors
        chunk, acc = ctx.cfg
        gx = chunked_gemm(g, w, chunk, acc) if ctx.needs_input_grad[0] else None  # over N
        gw = chunked_gemm(g.t(), x, chunk, acc) if ctx.needs_input_grad[1] else None  # over M
        return gx, gw, None, None


class _ChunkedConvFn(torch.autograd.Function):
    """Conv2d (groups = 1) as im2col + GEMM, the three GEMMs chunk-accumulated. Saves the
    im2col matrix for the backward (kh * kw times the input's memory)."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, dilation, chunk, acc):
        bsz, _, h, wd = x.shape
        cout, _, kh, kw = w.shape
        cols = torch.nn.functional.unfold(x, (kh, kw), dilation, padding, stride)  # (B, K, L)
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        ctx.save_for_backward(cols, w)
        ctx.cfg = (x.shape[-2:], stride, padding, dilation, chunk, acc)
        # out[b] = W (N, K) @ cols[b] (K, L): K chunks are views of cols' rows
        return chunked_gemm(w.reshape(cout, -1), cols, chunk, acc).reshape(bsz, cout, ho, wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cols, w = ctx.saved_tensors
        size, stride, padding, dilation, chunk, acc = ctx.cfg
        cout, cin, kh, kw = w.shape
        g = g.reshape(g.shape[0], cout, -1)  # (B, N, L)
        w2 = w.reshape(cout, -1)
        gx = gw = None
        if ctx.needs_input_grad[0]:  # reduction over N, then fold's overlap-add in FP32
            gcols = chunked_gemm(w2.t(), g, chunk, acc)
            gx = torch.nn.functional.fold(gcols, size, (kh, kw), dilation, padding, stride)
        if ctx.needs_input_grad[1]:  # reduction over the B * L positions
            gw = _chunked_weight_grad(g, cols, chunk, acc).reshape(w.shape)
        return gx, gw, None, None, None, None, None


def _chunked_weight_grad(g: torch.Tensor, cols: torch.Tensor, chunk: int,
                         acc_dtype: torch.dtype) -> torch.Tensor:
    """sum_{b, l} g[b, :, l] cols[b, :, l]^T (g: (B, N, L), cols: (B, K, L)) chunk-accumulated:
    chunks of ``chunk`` consecutive positions l of one sample (a shorter last chunk per
    sample when ``chunk`` does not divide L), added in sample order. One batched matmul per
    sample on strided views (no transposed copy of the im2col matrix)."""
    bsz, n, length = g.shape
    nf = length // chunk
    lf = nf * chunk
    acc = None
    for b in range(bsz):
        parts = []
        if nf:  # (nf, N, chunk) @ (nf, chunk, K): views, the cols side transposed
            gv = g[b, :, :lf].unflatten(-1, (nf, chunk)).transpose(0, 1)
            cv = cols[b, :, :lf].unflatten(-1, (nf, chunk)).permute(1, 2, 0)
            parts.append(torch.bmm(gv, cv).to(acc_dtype))
        if lf < length:
            parts.append((g[b, :, lf:] @ cols[b, :, lf:].t()).to(acc_dtype).unsqueeze(0))
        for part in parts:
            for c in range(part.shape[0]):
                if acc is None:
                    acc = part[c].clone()
                else:
                    acc.add_(part[c])
    return acc.float()


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   chunk: int = 64, acc_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``F.linear`` with chunk-based accumulation (:func:`chunked_gemm`) in the forward GEMM
    (reduction over in_features) and in the backward GEMMs (input error: reduction over
    out_features; weight gradient: reduction over the batch rows). Simplified: the bias is
    added in FP32 to the ``acc_dtype`` result and its gradient is an FP32 sum."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"chunked_linear: weight {tuple(weight.shape)} does not match input "
                         f"features {k}")
    out = _ChunkedLinearFn.apply(x.reshape(-1, k), weight, chunk, acc_dtype)
    out = out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    return out if bias is None else out + bias


def chunked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride=1, padding=0, dilation=1, groups: int = 1, chunk: int = 64,
                   acc_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``F.conv2d`` as unfold (im2col) + chunk-accumulated GEMMs, forward and backward.
    Forward: reduction over C_in/groups * kh * kw in im2col order (channel-major, then kernel
    row, column), so a chunk of 18 terms of a 3x3 conv is 2 input channels. Input error:
    reduction over the output channels. Weight gradient: reduction over the B * H_out *
    W_out positions, chunks of consecutive positions within one sample, samples in order. Simplified: the bias is added in FP32, the input
    gradient's overlap-add (``fold``, <= kh*kw terms per pixel) is an FP32 sum, and groups
    > 1 loop over the groups in Python (slow for depthwise convs). ``padding`` must be
    numeric (padding modes are applied by the caller, as ``nn.Conv2d._conv_forward`` does)."""
    if isinstance(padding, str):
        raise ValueError(f"chunked_conv2d: padding={padding!r}; give the padding as ints")
    if x.dim() != 4:
        raise ValueError(f"chunked_conv2d: input must be (B, C, H, W), got {tuple(x.shape)}")
    cin, cout, cg = x.shape[1], weight.shape[0], weight.shape[1]
    if cin != cg * groups:
        raise ValueError(f"chunked_conv2d: input channels {cin} != weight {cg} x groups {groups}")
    pair = torch.nn.modules.utils._pair
    args = (pair(stride), pair(padding), pair(dilation), chunk, acc_dtype)
    if groups == 1:
        out = _ChunkedConvFn.apply(x, weight, *args)
    else:
        og = cout // groups
        out = torch.cat([_ChunkedConvFn.apply(x[:, i * cg:(i + 1) * cg],
                                              weight[i * og:(i + 1) * og], *args)
                         for i in range(groups)], 1)
    out = out.to(x.dtype)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


_F = torch.nn.functional


class ChunkedAccumulation(torch.Tensor):
    """A view of a (FP8-rounded) tensor that makes the ``F.linear`` / ``F.conv2d`` call it
    enters use :func:`chunked_linear` / :func:`chunked_conv2d` (PyTorch's
    ``__torch_function__`` override protocol). The fake-quant layers pass the quantizer's
    output straight to ``F.linear`` / ``F.conv2d``, so an FP8TrainingQuantizer with
    ``accumulation='chunked'`` switches the layer's GEMMs without a new layer class. Every
    other op returns plain tensors. ``as_subclass`` keeps the autograd graph."""

    chunk: int
    acc_dtype: torch.dtype

    @staticmethod
    def wrap(t: torch.Tensor, chunk: int, acc_dtype: torch.dtype) -> ChunkedAccumulation:
        out = t.as_subclass(ChunkedAccumulation)
        out.chunk, out.acc_dtype = chunk, acc_dtype
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is _F.linear or func is _F.conv2d:
                flat = list(args) + list(kwargs.values())
                cfg = next(t for t in flat if isinstance(t, ChunkedAccumulation))
                plain = [t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t
                         for t in args]
                kw = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
                if "input" in kw:
                    kw["x"] = kw.pop("input")
                impl = chunked_linear if func is _F.linear else chunked_conv2d
                return impl(*plain, **kw, chunk=cfg.chunk, acc_dtype=cfg.acc_dtype)
            return func(*args, **kwargs)
