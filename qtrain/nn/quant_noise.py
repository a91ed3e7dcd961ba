"""Quant-Noise weight quantizer (Fan et al. 2020) for the fake-quant weight slot.

``QuantNoiseQuantizer`` plugs into ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``
(:mod:`qtrain.nn.fake_quant`) as ``weight_quantizer``. In training mode a random subset of
blocks (rate ``p``, see :mod:`qtrain.quant.quant_noise` for the block geometry) takes its
quantized value in the forward; in eval mode the rate is ``eval_p``: 0 evaluates the float
model, 1 the fully quantized one. The float parameter is never written.

Quantized value phi(W) (Fan 2020, sec. 4.2):
* ``mode='int8'`` / ``'int4'``: symmetric min-max scalar quantization, per tensor or per
  output channel (``granularity``), from :mod:`qtrain.quant.uniform`;
* ``mode='pq'``: the block's PQ codeword. Simplification (as the paper does for
  efficiency): the codebook (K = 2^bits centroids, k-means on the current weight) is
  refitted every ``pq_refresh`` training steps, not every step.

Randomness: the mask of training step t is drawn from a generator seeded with
``(seed, t)``; t is a buffer (saved in checkpoints), so resumed runs and all DDP ranks draw
the same masks.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import kmeans as KM
from qtrain.quant import quant_noise as QN
from qtrain.quant import uniform as U

MODES = {"int8": 8, "int4": 4, "pq": None}
GRANULARITIES = ("tensor", "channel")


class QuantNoiseQuantizer(Quantizer):
    """Block-wise quantization noise with a straight-through gradient.

    Args:
        bits: 8 for int8, 4 for int4 (derived from ``mode`` when None); for ``'pq'``
            log2 of the number of centroids (default 8 -> K = 256).
        p: training noise rate in [0, 1].
        block_size: input columns per block (Linear/Embedding/1x1 conv; kxk conv kernels
            are whole blocks).
        mode: 'int8', 'int4' or 'pq'.
        granularity: scale per 'tensor' or per output 'channel' (int modes).
        seed: mask seed (give each layer its own).
        eval_p: noise rate in eval mode (0: float model, 1: fully quantized model).
        pq_n_iter, pq_refresh: k-means iterations and refit period (training steps).
    """

    min_bits, max_bits = 1, 16

    def __init__(self, bits: int | None = None, p: float = 0.1, block_size: int = 8,
                 mode: str = "int8", granularity: str = "tensor", seed: int = 0,
                 eval_p: float = 0.0, pq_n_iter: int = 10, pq_refresh: int = 1000) -> None:
        if mode not in MODES:
            raise ValueError(f"QuantNoiseQuantizer: mode={mode!r}; allowed: {list(MODES)}")
        fixed = MODES[mode]
        if bits is None:
            bits = fixed if fixed is not None else 8
        if fixed is not None and bits != fixed:
            raise ValueError(f"QuantNoiseQuantizer: mode={mode!r} needs bits={fixed}, got {bits}")
        super().__init__(bits)
        for key, val in (("p", p), ("eval_p", eval_p)):
            if not 0.0 <= float(val) <= 1.0:
                raise ValueError(f"QuantNoiseQuantizer: {key}={val} must be in [0, 1]")
        if granularity not in GRANULARITIES:
            raise ValueError(f"QuantNoiseQuantizer: granularity={granularity!r}; "
                             f"allowed: {GRANULARITIES}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"QuantNoiseQuantizer: block_size={block_size!r} must be a "
                             "positive int")
        self.p, self.eval_p, self.block_size = float(p), float(eval_p), block_size
        self.mode, self.granularity, self.seed = mode, granularity, int(seed)
        self.pq_n_iter, self.pq_refresh = int(pq_n_iter), max(1, int(pq_refresh))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._last_mask: tuple | None = None  # ((data_ptr, version), mask) of the last step
        if mode == "pq":
            self.register_buffer("centroids", torch.empty(0))
            self.register_buffer("assignments", torch.empty(0, dtype=torch.long))
            self.register_buffer("fitted_at", torch.tensor(-1, dtype=torch.long))

    # -- quantized value phi(W) ------------------------------------------------------------
    @torch.no_grad()
    def quantized_value(self, w: torch.Tensor) -> torch.Tensor:
        """phi(W): the fully quantized weight (no gradient)."""
        if self.mode == "pq":
            self._maybe_fit(w)
            return KM.pq_reconstruct(self.centroids, self.assignments, w.shape).to(w.dtype)
        codes, scale = self._int_codes(w)
        return codes.mul_(scale).reshape(w.shape)

    def _int_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Int modes: symmetric min-max codes (N, in_flat) as floats and their scale (per
        tensor, or (N, 1) per output channel), as qtrain.quant.uniform computes them:
        ``clamp(round(w * (1/S)))``, in place (the fused fake-quant op is slow on CPU)."""
        qmin, qmax = U.code_range(self.bits, symmetric=True)
        wf = w.detach().reshape(w.shape[0], -1)
        if self.granularity == "tensor":
            lo, hi = torch.aminmax(wf)
        else:
            lo, hi = torch.aminmax(wf, dim=1, keepdim=True)
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(1e-8)
        return torch.mul(wf, scale.reciprocal()).round_().clamp_(qmin, qmax), scale

    def _maybe_fit(self, w: torch.Tensor) -> None:
        step = int(self.step)
        stale = self.centroids.numel() == 0 or (
            self.training and step - int(self.fitted_at) >= self.pq_refresh)
        if not stale:
            return
        bs = QN.noise_block_size(w, self.block_size)
        r = KM.pq_fit(w.detach(), bs, 2**self.bits, self.pq_n_iter, self.seed + step)
        self.centroids = r.centroids.to(w.dtype)
        self.assignments = r.assignments
        self.fitted_at.fill_(step)

    # -- forward --------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        p = self.p if self.training else self.eval_p
        if p <= 0.0:
            return w
        q = self.quantized_value(w)
        if p >= 1.0:
            mask = torch.ones_like(w, dtype=torch.bool)
        else:
            mask = self._training_mask(w, p) if self.training else self._draw(w, p)
        return QN.apply_noise(w, q, mask)

    def _draw(self, w: torch.Tensor, p: float) -> torch.Tensor:
        gen = torch.Generator(device=w.device)
        gen.manual_seed(self.seed * 1_000_003 + int(self.step))
        return QN.block_mask(w, p, self.block_size, gen)

    def _training_mask(self, w: torch.Tensor, p: float) -> torch.Tensor:
        """Mask of this training step; ``step`` advances once per weight update.

        A quantizer shared by tied layers (an LM's embedding and output projection) is
        called twice per forward with the same, not yet updated parameter: the second call
        reuses the first call's mask, so both uses see the same noised weight (the weight
        is one tensor). The parameter's version counter changes with every in-place
        optimizer update, which starts a new step.
        """
        ident = (w.data_ptr(), w._version)
        if self._last_mask is not None and self._last_mask[0] == ident:
            return self._last_mask[1]
        mask = self._draw(w, p)
        self.step += 1
        self._last_mask = (ident, mask)
        return mask

    @torch.no_grad()
    def export_qparams(self, weight: torch.Tensor) -> dict:
        """What :func:`qtrain.export.pack_model` stores: the fully quantized (p = 1) weight.

        Int modes: dict(codes (N, in_flat) int32, scale (1,) or (N,) float32, bits,
        granularity) with ``codes * scale == quantized_value(weight)`` exactly (same
        scale, round-half-even and clamp as the forward). ``'pq'``: dict(codes (N,
        in_flat / bs) long, centroids (K, bs), block_size) from the current codebook,
        fitted first (as :meth:`_maybe_fit`) if the quantizer never ran; block j of row n is
        assignment ``n * in_flat / bs + j`` (:func:`qtrain.quant.kmeans.blocks_of`).
        """
        w = weight.detach()
        n = w.shape[0]
        if self.mode == "pq":
            if self.centroids.numel() == 0:
                self._maybe_fit(w)
            bs = QN.noise_block_size(w, self.block_size)
            return {"codes": self.assignments.reshape(n, -1), "centroids": self.centroids,
                    "block_size": bs}
        codes, scale = self._int_codes(w)
        return {"codes": codes.to(torch.int32), "scale": scale.reshape(-1).float(),
                "bits": self.bits, "granularity": self.granularity}

    def storage_bits(self, weight: torch.Tensor) -> int:
        """Bits of the fully quantized weight (p = 1)."""
        if self.mode == "pq":
            bs = QN.noise_block_size(weight, self.block_size)
            return KM.pq_storage_bits(weight.numel() // bs, 2**self.bits, bs)
        n_params = 1 if self.granularity == "tensor" else weight.shape[0]
        return U.storage_bits(weight.numel(), self.bits, n_params, symmetric=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.mode == "pq":  # codebook buffers change shape when fitted
            for key in ("centroids", "assignments"):
                if prefix + key in state_dict:
                    setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, bits={self.bits}, p={self.p}, eval_p={self.eval_p}, "
                f"block_size={self.block_size}, granularity={self.granularity}, "
                f"enabled={self.enabled}")
