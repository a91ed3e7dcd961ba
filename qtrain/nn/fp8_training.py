"""Simulated FP8 training (Wang et al. 2018, "Training Deep Neural Networks with 8-bit
Floating Point Numbers", NeurIPS), on any device (CPU included), with the FP8 formats of
:mod:`qtrain.quant.floats`.

* :class:`FP8TrainingQuantizer`: a quantizer for the weight and activation slots of the
  fake-quant layers (``QATCallback(weight=..., act=..., bits=8)``). Forward: the tensor is
  rounded to ``fmt`` (Wang 2018 use FP8 (1, 5, 2) = E5M2 for weights, activations, errors
  and gradients, sec. 3). Backward: the incoming gradient is rounded to ``grad_fmt`` (E5M2)
  -- in the weight slot this is the weight gradient, in the activation slot the error
  propagated to the layer input ("errors" in FP8). Gradients smaller than E5M2's smallest
  subnormal (2^-16) flush to zero: use loss scaling (Wang use a constant 1000 for some
  nets; ``LossScaleMonitor`` + Lightning's GradScaler for dynamic scaling).
* :func:`chunked_matmul`: chunk-based accumulation (Wang 2018 sec. 3.1, Fig. 2): the dot
  products of a GEMM are split into chunks of ``chunk`` (CL = 64) terms; terms are added
  inside a chunk in ``acc_dtype`` (FP16), and the chunk sums are added to the running result
  in FP16. This avoids "swamping" (a small addend lost against a large sum) that makes long
  FP16 sequential accumulations fail. It is a *numerical simulation*: every product and
  every partial sum is rounded to ``acc_dtype`` exactly as FP16 hardware would (IEEE
  round-to-nearest-even, computed through float64), vectorised over the output and over the
  chunks; it is slow and meant for studying accuracy, not for speed.
  :func:`sequential_matmul` (one chunk of length K) is the naive FP16 accumulation.

Simplifications: the paper's FP16 master-weight updates with stochastic rounding are not
simulated here (weights stay FP32 masters, as in Micikevicius 2018 mixed precision); the
layers' own matmuls use FP32 accumulation unless :func:`chunked_matmul` is called.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant.floats import default_saturate, get_format, simulate_float
from qtrain.quant.rounding import check_rounding

FP8_FORMATS = ("e4m3", "e5m2")


class _FP8TrainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, saturate, rounding, grad_fmt, grad_saturate, grad_rounding, gen, ggen):
        f = get_format(fmt)
        sat = default_saturate(f) if saturate is None else saturate
        ctx.save_for_backward(x.abs() <= f.max_value if sat else None)
        ctx.grad_args = (grad_fmt, grad_saturate, grad_rounding, ggen)
        return simulate_float(x, f, sat, rounding, gen).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        if inside is not None:  # clipped STE where the forward saturated
            g = g * inside
        fmt, sat, rounding, gen = ctx.grad_args
        gq = simulate_float(g, fmt, sat, rounding, gen).to(g.dtype)
        return gq, None, None, None, None, None, None, None, None


class FP8TrainingQuantizer(Quantizer):
    """FP8 forward value and FP8 backward gradient (Wang 2018; see module docstring).

    Args:
        bits: 8.
        fmt: forward format, 'e5m2' (Wang 2018) or 'e4m3'.
        grad_fmt: gradient format, 'e5m2' (default) or 'e4m3'.
        saturate / grad_saturate: overflow behaviour (None: as the torch cast; e5m2 then
            overflows to inf, which GradScaler detects and skips).
        rounding / grad_rounding: 'nearest' | 'stochastic' | 'truncate'.
        seed: generator seed for stochastic rounding (None: global RNG).
    Storage: 8 bits per element.
    """

    min_bits = max_bits = 8

    def __init__(self, bits: int = 8, fmt: str = "e5m2", grad_fmt: str = "e5m2",
                 saturate: bool | None = None, grad_saturate: bool | None = None,
                 rounding: str = "nearest", grad_rounding: str = "nearest",
                 seed: int | None = None) -> None:
        super().__init__(bits)
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
        return _FP8TrainFn.apply(
            x, self.fmt, self.saturate, self.rounding, self.grad_fmt, self.grad_saturate,
            self.grad_rounding, self._gen(x.device, "fwd", self.rounding),
            self._gen(x.device, "grad", self.grad_rounding))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return 8 * weight.numel()

    def extra_repr(self) -> str:
        return (f"fmt={self.fmt}, grad_fmt={self.grad_fmt}, rounding={self.rounding}, "
                f"grad_rounding={self.grad_rounding}, enabled={self.enabled}")


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
