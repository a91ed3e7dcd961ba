"""Quant-Noise weight and output-activation quantizers (Fan et al. 2020, sec. 4, eq. (5)-(6)).

``QuantNoiseQuantizer`` plugs into ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``
(:mod:`qtrain.nn.fake_quant`) as ``weight_quantizer``. In training mode a random subset of
the weight (rate ``p``) takes its quantized value in the forward; in eval mode the rate is
``eval_p``: 0 evaluates the float model, 1 the fully quantized one. The float parameter is
never written. Noise units and quantizers are those of :mod:`qtrain.quant.quant_noise`:

* ``mode='int8'`` / ``'int4'`` (fairseq's scalar ``IntLinear`` / ``IntConv2d`` /
  ``IntEmbedding``): a Bernoulli(p) per *weight*; phi(W) is the paper's sec. 3.1 min-max
  quantizer per tensor, s = (max - min) / (2^N - 1) with a zero-point, all 2^N codes
  (``granularity='tensor'``, default), recomputed from the current weight at every
  forward. Option ``granularity='channel'``: symmetric per output channel. fairseq
  recomputes the scale only every ``update_step`` = 1000 forwards and clamps the float
  weights to that stale range; here the range is always the current weight's.
* ``mode='pq'``: blocks (``block_size`` input columns; kxk conv kernels) drawn with rate p
  take their PQ value: the nearest codeword of the block's *current* value. The codebook
  (K = 2^bits centroids, k-means on the current weight) is refitted every ``pq_refresh``
  training steps (the paper's efficiency simplification); the assignment is never stale.
* ``mode='drop'`` (fairseq's ``quant_noise``, "the simplest form of noise"; its README:
  "worked as well as assigning those blocks to their current centroid"): in training the
  selected blocks are zeroed and the others rescaled by 1 / (1 - p) (forward value only).
  In eval (``eval_p`` > 0) and in the export it is the PQ value, as ``'pq'``; training never
  needs the codebook, so it is fitted when an evaluation / export first needs it and refitted
  there once it is ``pq_refresh`` or more training steps old (same age bound as ``'pq'``).

Steps: the training loop advances the quantizer with :meth:`QuantNoiseQuantizer.new_step`
once per training batch (``QuantNoiseCallback.on_train_batch_start``); the mask of step t
is drawn from a generator seeded with ``(seed, t)`` and reused by every call within the
step (a weight tied to two layers sees one noised value). ``step`` is a buffer (saved in
checkpoints), so resumed runs and all DDP ranks draw the same masks. A training forward
before the first ``new_step`` raises (nothing would advance the mask otherwise).

``OutputQuantNoise`` quantizes a noised module's *output* (fairseq's scalar
``ActivationQuantizer``, a forward hook that fairseq's ``quantize_model_`` attaches to every
module it quantizes, with the weights' bits and method): per-tensor min-max, range
recomputed from the current output every ``update_step`` training steps (fairseq: 1000;
under DDP the min / max over all ranks, so the ranks agree) and kept in between; in
training the output is clamped to that range with a straight-through gradient inside it
(0 outside) and a Bernoulli(``p``) subset of the elements takes its quantized value --
fairseq builds it with ``p=0``, i.e. training only clamps; in eval the rate is ``eval_p``
(1: fully quantized, with the stored range). Deviations: fairseq's noised value is
``clamp(y) + q(y) - y``, which reflects outputs beyond the range (2 hi - y), here it is
q(y); fairseq's counter also advances (and may refit) on evaluation forwards, here only
training steps refit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import kmeans as KM
from qtrain.quant import quant_noise as QN
from qtrain.quant import uniform as U

MODES = {"int8": 8, "int4": 4, "pq": None, "drop": None}
GRANULARITIES = ("tensor", "channel")


def _check_rate(owner: str, key: str, val) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0:
        raise ConfigError(f"{owner}: {key}={val!r} must be a number in [0, 1]")
    return float(val)


class _StepMixin:
    """A ``step`` buffer advanced by the training loop (:meth:`new_step`)."""

    step: torch.Tensor

    def new_step(self) -> None:
        """Start the next training step: a new noise mask (and refits when due)."""
        self.step += 1
        self._mask_cache = None

    def _check_stepped(self) -> None:
        if int(self.step) == 0:
            raise RuntimeError(
                f"{type(self).__name__}: a training forward before any new_step(); the "
                "training loop must call new_step() once per training batch "
                "(qtrain.callbacks.quant_noise.QuantNoiseCallback does)")


class QuantNoiseQuantizer(_StepMixin, Quantizer):
    """Quantization noise on a weight with a straight-through gradient.

    Args:
        bits: 8 for int8, 4 for int4 (derived from ``mode`` when None); for 'pq' / 'drop'
            log2 of the number of centroids (default 8 -> K = 256).
        p: training noise rate in [0, 1] ('drop': [0, 1)).
        block_size: PQ block: input columns per block (Linear/Embedding/1x1 conv; kxk
            conv kernels are whole blocks). Unused by the int modes (noise per weight).
        mode: 'int8', 'int4', 'pq' or 'drop'.
        granularity: int modes: 'tensor' (min-max asymmetric, the paper's) or 'channel'
            (symmetric per output channel, option).
        seed: mask seed (give each layer its own).
        eval_p: noise rate in eval mode (0: float model, 1: fully quantized model).
        pq_n_iter, pq_refresh: k-means iterations and codebook refit period (steps).
    """

    min_bits, max_bits = 1, 16

    def __init__(self, bits: int | None = None, p: float = 0.1, block_size: int = 8,
                 mode: str = "int8", granularity: str = "tensor", seed: int = 0,
                 eval_p: float = 0.0, pq_n_iter: int = 10, pq_refresh: int = 1000) -> None:
        if mode not in MODES:
            raise ConfigError(f"QuantNoiseQuantizer: mode={mode!r}; allowed: {list(MODES)}")
        fixed = MODES[mode]
        if bits is None:
            bits = fixed if fixed is not None else 8
        if fixed is not None and bits != fixed:
            raise ConfigError(f"QuantNoiseQuantizer: mode={mode!r} needs bits={fixed}, "
                              f"got {bits}")
        super().__init__(bits)
        self.p = _check_rate("QuantNoiseQuantizer", "p", p)
        self.eval_p = _check_rate("QuantNoiseQuantizer", "eval_p", eval_p)
        if mode == "drop" and self.p >= 1.0:
            raise ConfigError("QuantNoiseQuantizer: mode='drop' needs p < 1 (rescale 1/(1-p)), "
                              f"got p={p}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"QuantNoiseQuantizer: granularity={granularity!r}; "
                              f"allowed: {GRANULARITIES}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f"QuantNoiseQuantizer: block_size={block_size!r} must be a "
                              "positive int")
        self.block_size, self.mode, self.granularity = block_size, mode, granularity
        self.seed = int(seed)
        self.pq_n_iter, self.pq_refresh = int(pq_n_iter), max(1, int(pq_refresh))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._mask_cache: tuple | None = None  # (step, shape, mask) of the current step
        if self.is_pq:
            self.register_buffer("centroids", torch.empty(0))
            self.register_buffer("fitted_at", torch.tensor(-1, dtype=torch.long))

    @property
    def is_pq(self) -> bool:
        return self.mode in ("pq", "drop")

    # -- quantized value phi(W) ------------------------------------------------------------
    @torch.no_grad()
    def quantized_value(self, w: torch.Tensor) -> torch.Tensor:
        """phi(W): the fully quantized current weight (no gradient)."""
        if self.is_pq:
            return self.pq_codes(w)[1]
        qp = self.int_qparams(w)
        w2 = w.reshape(w.shape[0], -1)
        return QN.fake_quant(w2, qp).reshape(w.shape)

    def int_qparams(self, w: torch.Tensor) -> U.QParams:
        """Int modes: min-max affine per tensor, or symmetric (N, 1) per output channel."""
        if self.granularity == "tensor":
            return QN.minmax_qparams(w, self.bits)
        return QN.symmetric_channel_qparams(w, self.bits)

    @torch.no_grad()
    def pq_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PQ modes: (assignments, reconstructed weight): the nearest codeword of every block
        of the current ``w`` (the codebook fitted first if it never was, or refitted in
        training when ``pq_refresh`` steps have passed)."""
        self._maybe_fit(w)
        bs = QN.noise_block_size(w, self.block_size)
        return QN.pq_nearest(w, self.centroids, bs)

    def _maybe_fit(self, w: torch.Tensor) -> None:
        step = int(self.step)
        # 'pq' refits in training (its noise uses the codebook); 'drop' never uses it in
        # training, so its quantized evaluation / export refits when the codebook is due
        stale = self.centroids.numel() == 0 or (
            (self.training or self.mode == "drop")
            and step - int(self.fitted_at) >= self.pq_refresh)
        if not stale:
            return
        bs = QN.noise_block_size(w, self.block_size)
        r = KM.pq_fit(w.detach(), bs, 2**self.bits, self.pq_n_iter, self.seed + step)
        self.centroids = r.centroids.to(w.dtype)
        self.fitted_at.fill_(step)

    # -- forward --------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.p <= 0.0:
                return w
            self._check_stepped()
            mask = self._step_mask(w)
            if self.mode == "drop":
                return QN.drop_noise(w, mask, self.p)
            return QN.apply_noise(w, self.quantized_value(w), mask)
        p = self.eval_p
        if p <= 0.0:
            return w
        q = self.quantized_value(w)
        mask = torch.ones_like(w, dtype=torch.bool) if p >= 1.0 else self._draw(w, p)
        return QN.apply_noise(w, q, mask)

    def _draw(self, w: torch.Tensor, p: float) -> torch.Tensor:
        gen = torch.Generator(device=w.device)
        gen.manual_seed(self.seed * 1_000_003 + int(self.step))
        if self.is_pq:
            return QN.block_mask(w, p, self.block_size, gen)
        return QN.weight_mask(w, p, gen)

    def _step_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The mask of this training step, drawn on its first use and reused by later calls
        of the same step (a quantizer shared by tied layers is called twice per forward)."""
        key = (int(self.step), tuple(w.shape), w.device)
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]
        mask = self._draw(w, self.p)
        self._mask_cache = (key, mask)
        return mask

    @torch.no_grad()
    def export_qparams(self, weight: torch.Tensor) -> dict:
        """What :func:`qtrain.export.pack_model` stores: the fully quantized (p = 1) weight
        as it is now (exactly :meth:`quantized_value`).

        Int modes: dict(codes (N, in_flat) int32, scale and zero_point ((1,) per tensor or
        (N,) per channel) float32, bits, granularity, symmetric) with ``(codes -
        zero_point) * scale == quantized_value(weight)``: per tensor codes in [0, 2^N - 1]
        with an integer zero-point, per channel signed codes with zero-point 0.
        PQ modes: dict(codes (N, in_flat / bs) long, centroids (K, bs), block_size): the
        nearest codeword of every block of the current weight (:meth:`pq_codes`); block j
        of row n is code ``[n, j]`` (:func:`qtrain.quant.kmeans.blocks_of`).
        """
        w = weight.detach()
        n = w.shape[0]
        if self.is_pq:
            codes, _ = self.pq_codes(w)
            bs = QN.noise_block_size(w, self.block_size)
            return {"codes": codes.reshape(n, -1), "centroids": self.centroids,
                    "block_size": bs}
        qp = self.int_qparams(w)
        codes = QN.int_codes(w.reshape(n, -1), qp)
        return {"codes": codes.to(torch.int32), "scale": qp.scale.reshape(-1).float(),
                "zero_point": qp.zero_point.reshape(-1).float(), "bits": self.bits,
                "granularity": self.granularity, "symmetric": self.granularity == "channel"}

    def storage_bits(self, weight: torch.Tensor) -> int:
        """Bits of the fully quantized weight (p = 1)."""
        if self.is_pq:
            bs = QN.noise_block_size(weight, self.block_size)
            return KM.pq_storage_bits(weight.numel() // bs, 2**self.bits, bs)
        if self.granularity == "tensor":
            return U.storage_bits(weight.numel(), self.bits, 1, symmetric=False)
        return U.storage_bits(weight.numel(), self.bits, weight.shape[0], symmetric=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.is_pq:  # the codebook buffer changes shape when fitted
            if prefix + "centroids" in state_dict:
                self.centroids = torch.empty_like(state_dict[prefix + "centroids"])
            state_dict.pop(prefix + "assignments", None)  # stored by older versions
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, bits={self.bits}, p={self.p}, eval_p={self.eval_p}, "
                f"block_size={self.block_size}, granularity={self.granularity}, "
                f"enabled={self.enabled}")


class OutputQuantNoise(_StepMixin, Quantizer):
    """Quantization of a noised module's output (fairseq ``ActivationQuantizer``); see the
    module docstring.

    Args:
        bits: 8 or 4 (the weights' bits). p: training noise rate (fairseq: 0, clamp only).
        eval_p: rate in eval mode (0: float, 1: fully quantized). update_step: steps
            between range refits (fairseq: 1000).
    """

    min_bits, max_bits = 1, 8

    def __init__(self, bits: int = 8, p: float = 0.0, eval_p: float = 0.0,
                 update_step: int = 1000) -> None:
        super().__init__(bits)
        self.p = _check_rate("OutputQuantNoise", "p", p)
        self.eval_p = _check_rate("OutputQuantNoise", "eval_p", eval_p)
        if isinstance(update_step, bool) or not isinstance(update_step, int) or update_step < 1:
            raise ConfigError(f"OutputQuantNoise: update_step={update_step!r} must be a "
                              "positive int")
        self.update_step = update_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("fitted_at", torch.tensor(-1, dtype=torch.long))
        self._mask_cache = None

    def qparams(self) -> U.QParams:
        qmin, qmax = U.code_range(self.bits, symmetric=False)
        return U.QParams(self.scale, self.zero_point, qmin, qmax)

    @torch.no_grad()
    def _refit(self, y: torch.Tensor) -> None:
        """Min-max range of this output; under DDP the min / max over all ranks' outputs
        (one all-reduce), so every rank holds the same range."""
        lo, hi = torch.aminmax(y.detach().float())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ext = torch.stack([-lo, hi])
            dist.all_reduce(ext, op=dist.ReduceOp.MAX)
            lo, hi = -ext[0], ext[1]
        qp = U.qparams_from_range(lo, hi, self.bits, symmetric=False)
        self.scale.copy_(qp.scale)
        self.zero_point.copy_(qp.zero_point)
        self.fitted_at.fill_(int(self.step))

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._check_stepped()
            if int(self.fitted_at) < 0 or int(self.step) - int(self.fitted_at) >= self.update_step:
                self._refit(y)
            p = self.p
        else:
            p = self.eval_p
            if p <= 0.0:
                return y
            if int(self.fitted_at) < 0:  # evaluated before any training step
                self._refit(y)
        qp = self.qparams()
        lo = float((qp.qmin - qp.zero_point) * qp.scale)
        hi = float((qp.qmax - qp.zero_point) * qp.scale)
        yc = y.clamp(lo, hi)  # straight-through inside the range, 0 outside
        if p <= 0.0:
            return yc
        q = QN.fake_quant(y, qp)
        mask = torch.ones_like(y, dtype=torch.bool) if p >= 1.0 else QN.weight_mask(y, p)
        return QN.apply_noise(yc, q, mask)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, p={self.p}, eval_p={self.eval_p}, "
                f"update_step={self.update_step}")


def _quantize_output(module: nn.Module, inputs, output):
    return module.output_quantizer(output)


def attach_output_quantizer(layer: nn.Module, quantizer: OutputQuantNoise) -> None:
    """Quantize ``layer``'s output with ``quantizer`` (a forward hook; the quantizer is the
    submodule ``layer.output_quantizer``, so its range is in the state dict)."""
    layer.output_quantizer = quantizer
    layer.register_forward_hook(_quantize_output)
