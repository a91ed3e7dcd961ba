"""Soft-to-hard vector quantization of the weights as a Lightning callback (Agustsson et al.
2017, "Soft-to-Hard Vector Quantization for End-to-End Learning Compressible
Representations", NeurIPS; the DNN-compression application of sec. 3-4).

Layers: the selected conv / linear weights get a :class:`~qtrain.nn.learned_quantizers.
SoftToHardVQ` (2^bits learnable centers of ``dim``-element sub-vectors, per layer) through
:class:`~qtrain.callbacks.qat.QATCallback` (same layer selection, ``first_last``, overrides
and ``start_epoch`` FP32 phase). The forward is always the hard quantization; the backward
is the soft one (the paper's stop-gradient form).

Objective: task loss + ``beta`` * R, where R is the soft entropy estimate H(p, q~) of the
code symbols (:meth:`SoftToHardVQ.soft_entropy`), averaged over all symbols of the model:
R = sum_l m_l H_l / sum_l m_l bits per symbol (m_l sub-vectors in layer l), so beta * R * sum_l m_l
is the rate term of the paper's rate-distortion loss (entropy in bits; the paper writes
beta H(...)). Installed as the LightningModule's ``loss_hook`` while the quantizers are soft.

Annealing (soft to hard): sigma goes geometrically from ``sigma_start`` to ``sigma_end`` over
the soft phase's training steps, sigma_t = sigma_start (sigma_end / sigma_start)^(t / T),
t = steps since quantization started, T = steps of the soft phase; it is a pure function of
the global step, so a resumed run continues on the same schedule. The paper anneals sigma
upward (continuation); its exact schedule is not reproduced here (~, not re-verified).

Hard assignments at the end: for the last ``hard_epochs`` epochs the quantizers are hard
(sigma = infinity: forward and backward use the nearest centers; the weights get no gradient
through the quantizer, the centers are finetuned with the summed gradients of their
sub-vectors, and the rate term is constant and dropped); at the end of fit every quantizer is
hard in any case, so the evaluated, reported and exported model is the hard one. Export: the
existing packed formats of SoftToHardVQ (``lut`` for dim = 1, ``codebook`` otherwise, bits
<= 8); the run's Huffman row entropy-codes the hard codes (:meth:`SoftToHardVQ.codes`).

Simplifications vs the paper: one codebook per layer (the paper's network compression
shares the centers across the network, ~, not re-verified); centers initialised to random
sub-vectors of the layer rather than by k-means; ``sigma_units='variance'`` is our option.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.nn.learned_quantizers import SIGMA_UNITS, SoftToHardVQ

log = logging.getLogger("qtrain")


class SoftToHardVQCallback(QATCallback):
    """Args:
        bits: log2 of the number of centers L per layer (1..8 to export).
        dim: sub-vector length d (1: scalar quantization).
        sigma_start, sigma_end: the annealing range of sigma (sigma_end >= sigma_start > 0).
        sigma_units: 'absolute' (the paper) or 'variance' (distances in units of the layer's
            weight variance; :class:`SoftToHardVQ`).
        beta: weight of the rate term (bits per symbol); 0 disables it.
        hard_epochs: epochs at the end of fit trained with hard assignments (>= 0).
        seed: center initialisation seed (a per-layer seed is derived from it).
        include / exclude / types / first_last / overrides / start_epoch: as QATCallback.
    """

    def __init__(self, bits: int = 4, dim: int = 1, sigma_start: float = 1.0,
                 sigma_end: float = 1000.0, sigma_units: str = "absolute", beta: float = 0.0,
                 hard_epochs: int = 0, seed: int = 0, include=(".*",), exclude=(),
                 types=("Linear", "Conv2d"), first_last: str = "keep", overrides=None,
                 start_epoch: int = 0) -> None:
        if not 0 < float(sigma_start) <= float(sigma_end):
            raise ConfigError(f"quant.sigma_start={sigma_start}, quant.sigma_end={sigma_end}: "
                              "need 0 < sigma_start <= sigma_end")
        if float(beta) < 0:
            raise ConfigError(f"quant.beta={beta}: must be >= 0")
        if not isinstance(hard_epochs, int) or hard_epochs < 0:
            raise ConfigError(f"quant.hard_epochs={hard_epochs!r}: must be an int >= 0")
        if sigma_units not in SIGMA_UNITS:
            raise ConfigError(f"quant.sigma_units={sigma_units!r}; allowed: {SIGMA_UNITS}")
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"quant.dim={dim!r}: must be an int >= 1")
        factory = functools.partial(SoftToHardVQ, dim=dim, sigma=float(sigma_start), seed=seed,
                                    sigma_units=sigma_units)
        super().__init__(bits=bits, weight=factory, act=None, include=include, exclude=exclude,
                         types=types, first_last=first_last, overrides=overrides,
                         start_epoch=start_epoch)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.beta, self.hard_epochs = float(beta), hard_epochs
        self.last_rate: float | None = None

    # -- schedule --------------------------------------------------------------------
    def quantizers(self) -> list[tuple[str, torch.nn.Module, SoftToHardVQ]]:
        return [(n, m, m.weight_quantizer) for n, m in self.layers.items()
                if isinstance(getattr(m, "weight_quantizer", None), SoftToHardVQ)]

    def hard_start_epoch(self, trainer) -> int:
        return max(int(trainer.max_epochs) - self.hard_epochs, self.start_epoch)

    @staticmethod
    def steps_per_epoch(trainer) -> int:
        n = trainer.num_training_batches
        return max(int(n), 1) if math.isfinite(n) else 1

    def soft_steps(self, trainer) -> int:
        """T: training steps from the start of quantization to the hard phase."""
        epochs = self.hard_start_epoch(trainer) - self.start_epoch
        return max(epochs * self.steps_per_epoch(trainer), 1)

    def sigma_at(self, step: int, total: int) -> float:
        """sigma_start (sigma_end / sigma_start)^(step / total), step clipped to [0, total]."""
        frac = min(max(step / max(total, 1), 0.0), 1.0)
        return self.sigma_start * (self.sigma_end / self.sigma_start) ** frac

    def set_hard(self, flag: bool) -> None:
        for _, _, q in self.quantizers():
            q.set_hard(flag)

    def is_hard(self) -> bool:
        qs = self.quantizers()
        return bool(qs) and all(bool(q.hard) for _, _, q in qs)

    # -- Lightning hooks -------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            if trainer.max_epochs is None or int(trainer.max_epochs) < 1:
                raise ConfigError(f"quant (soft-to-hard VQ): the sigma schedule and hard_epochs "
                                  f"need trainer.max_epochs >= 1, got {trainer.max_epochs}")
            hook = getattr(pl_module, "loss_hook", None)
            if hook is not None and hook != self.loss_hook:
                raise ConfigError("quant (soft-to-hard VQ): the LightningModule's loss_hook is "
                                  "taken by another callback (e.g. distillation); they cannot "
                                  "be combined")
            pl_module.loss_hook = self.loss_hook

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "loss_hook", None) == self.loss_hook:
            pl_module.loss_hook = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.set_hard(trainer.current_epoch >= self.hard_start_epoch(trainer))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.set_hard(trainer.current_epoch >= self.hard_start_epoch(trainer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.current_epoch < self.start_epoch:
            return
        step = (trainer.current_epoch - self.start_epoch) * self.steps_per_epoch(trainer) + batch_idx
        sigma = self.sigma_at(step, self.soft_steps(trainer))
        for _, _, q in self.quantizers():
            q.anneal(sigma)
        pl_module.log("s2h/sigma", sigma, on_step=True, on_epoch=False)

    def rate(self) -> torch.Tensor:
        """R = sum_l m_l H(p_l, q~_l) / sum_l m_l: soft entropy, bits per code symbol."""
        total, n = 0.0, 0
        for _, m, q in self.quantizers():
            k = m.weight.numel() // q.dim
            total = total + k * q.soft_entropy(m.weight)
            n += k
        return total / max(n, 1)

    @torch.no_grad()
    def hard_rate(self) -> float:
        """sum_l m_l H(p_l) / sum_l m_l: the entropy of the hard codes, bits per symbol."""
        qs = self.quantizers()
        n = sum(m.weight.numel() // q.dim for _, m, q in qs)
        return sum(float(q.hard_entropy(m.weight)) * (m.weight.numel() // q.dim)
                   for _, m, q in qs) / max(n, 1)

    def loss_hook(self, module, batch, outputs, loss):
        """Installed as ``pl_module.loss_hook``: task loss + beta * R while soft and enabled."""
        qs = self.quantizers()
        if self.beta == 0 or not qs or not qs[0][2].enabled or self.is_hard():
            return loss
        r = self.rate()
        self.last_rate = float(r.detach())
        module.log("s2h/rate_bits", r.detach(), on_step=True, on_epoch=True)
        return loss + self.beta * r

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.quantizers() and trainer.current_epoch >= self.start_epoch:
            h = self.hard_rate()
            pl_module.log("s2h/entropy_bits", h)
            log.info("soft-to-hard VQ epoch %d: sigma %.4g, code entropy %.3f bits/symbol%s",
                     trainer.current_epoch, float(self.quantizers()[0][2].sigma), h,
                     " (hard)" if self.is_hard() else "")

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        self.set_hard(True)  # the evaluated / exported model uses hard assignments
        log.info("soft-to-hard VQ: hard assignments; code entropy %.3f bits/symbol",
                 self.hard_rate())
