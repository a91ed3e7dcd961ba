"""Quantizer modules with learned parameters or special gradient estimators.

Every class subclasses :class:`qtrain.nn.quantizer_base.Quantizer` (``bits`` first, ``enabled``,
``storage_bits``). ``storage_bits(weight)`` counts the codes plus every number needed to decode
them, stored as fp32 (learned step / clip / points / centers). Note: the fake-quant layers'
``storage_bits`` already adds the layer's non-weight Parameters (those of its quantizers); use
one or the other, not both.

* :class:`DoReFaWeightQuantizer`, :class:`DoReFaActQuantizer` -- Zhou et al. 2016 (DoReFa-Net),
  math in :mod:`qtrain.quant.estimators`.
* :class:`PACTQuantizer` -- Choi et al. 2018 (PACT), learned clipping level alpha.
* :class:`LSQQuantizer` -- Esser et al. 2020 (Learned Step Size Quantization).
* :class:`DSQQuantizer` -- Gong et al. 2019 (Differentiable Soft Quantization).
* :class:`PolinoDifferentiableQuantizer` -- Polino et al. 2018, differentiable quantization
  (lives in :mod:`qtrain.nn.polino_quantizer`; re-exported here).
* :class:`SoftToHardVQ` -- Agustsson et al. 2017, soft-to-hard vector quantization.

Regularisers: quantizers with a ``regularization()`` method (PACT's L2 on alpha) are summed by
:func:`regularization_loss`; a LightningModule adds ``regularization_loss(self)`` to its loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.polino_quantizer import PolinoDifferentiableQuantizer  # noqa: F401 (re-export)
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import estimators as E

_EPS = 1e-8


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``m.regularization()`` over all submodules that define it (0 if none)."""
    terms = [m.regularization() for m in model.modules() if hasattr(m, "regularization")]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa-Net weights (Zhou 2016, eq. 9; 1 bit: eqs. 7-8). Values lie in [-1, 1] on the grid
    ``2 i / (2^k - 1) - 1`` (k > 1) so only the k-bit codes are stored; 1 bit stores a sign bit
    per weight plus the fp32 scale E|w|."""

    min_bits, max_bits = 1, 8

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return E.dorefa_weight(x, self.bits)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + (32 if self.bits == 1 else 0)


DOREFA_GRAD_AT = ("output", "input")


class DoReFaActQuantizer(Quantizer):
    """DoReFa-Net activations ``quantize_k(clip(x, 0, 1))`` (eq. 11) of a layer's input, and
    the k-bit gradient quantizer of eq. (12) for that layer.

    ``grad_bits``: if set, gradients are quantized with eq. (12) (per-sample max, uniform
    noise; ``seed`` makes it reproducible). ``grad_at``: where --
    'output' (default; DoReFa Alg. 1 and the authors' tensorpack code, which apply ``fg``
    right after each quantized conv / fc, before BatchNorm): the gradient of the layer's
    OUTPUT, so the error entering both backward GEMMs of the layer is k-bit (the fake-quant
    layer calls :meth:`quantize_output_grad`); 'input': the gradient flowing back through
    this input quantizer towards the previous layer (the old behaviour; BatchNorm's backward
    turns it back to full precision before it reaches a convolution).
    """

    min_bits, max_bits = 1, 8

    def __init__(
        self, bits: int = 4, grad_bits: int | None = None, per_sample: bool = True,
        seed: int | None = None, grad_at: str = "output",
    ) -> None:
        super().__init__(bits)
        if grad_bits is not None:
            E._check_bits(grad_bits, f"{type(self).__name__} grad_bits")
        if grad_at not in DOREFA_GRAD_AT:
            raise ConfigError(f"{type(self).__name__}: grad_at={grad_at!r}; allowed: "
                              f"{DOREFA_GRAD_AT}")
        self.grad_bits, self.grad_at = grad_bits, grad_at
        self.per_sample = per_sample
        self.seed = seed
        self._gen: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_bits is not None and self.grad_at == "input":
            x = E.quantize_gradient(x, self.grad_bits, self.per_sample, self._generator(x.device))
        return E.dorefa_activation(x, self.bits)

    def quantize_output_grad(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output ``y`` unchanged, its gradient quantized with eq. (12)
        (``grad_at='output'`` and enabled; otherwise ``y`` as is)."""
        if not self.enabled or self.grad_bits is None or self.grad_at != "output":
            return y
        return E.quantize_gradient(y, self.grad_bits, self.per_sample, self._generator(y.device))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel()

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, grad_bits={self.grad_bits}, grad_at={self.grad_at}, "
                f"enabled={self.enabled}")


class _PACTFn(torch.autograd.Function):
    """PACT (Choi 2018) eqs. (1)-(3): y = clip(x, 0, a); y_q = round(y (2^k-1) / a) a / (2^k-1).
    dy_q/dx = 1 on [0, a) (STE), else 0;  dy_q/da = 1 where x >= a, else 0."""

    @staticmethod
    def forward(ctx, x, alpha, n):
        a = alpha.clamp_min(_EPS)
        ctx.save_for_backward(x, a)
        ctx.alpha_shape = alpha.shape
        scale = a / n
        return torch.round(torch.minimum(x.clamp_min(0.0), a) / scale) * scale

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        grad_x = g * ((x >= 0) & (x < a))
        grad_a = (g * (x >= a)).sum().reshape(ctx.alpha_shape)
        return grad_x, grad_a, None


class PACTQuantizer(Quantizer):
    """PACT activation quantizer (Choi et al. 2018): learned clip ``alpha`` + k-bit uniform.

    Args:
        bits: 1..8 (unsigned codes 0..2^k-1 on [0, alpha]).
        alpha_init: initial clipping level (paper: ~10; Distiller uses 8), or
            ``"calibrate"`` (our option, for fine-tuning a pretrained network): alpha is set
            on the first forward that quantizes, to the ``calib_percentile``-th percentile of
            that batch's inputs (the paper trains from scratch, where alpha = 10 shrinks over
            200 epochs; a pretrained network's activations rarely reach 10, so alpha gets no
            loss gradient -- PACT's d y / d alpha is 1 only where x >= alpha -- and the k-bit
            step stays alpha / (2^k - 1) ~ 0.67 at 4 bits). Until then alpha is NaN; a
            loaded checkpoint's alpha is kept.
        calib_percentile: percentile (0, 100] for ``alpha_init="calibrate"``.
        l2_decay: lambda of the paper's L2 regulariser on alpha. It is *not* applied by the
            optimizer: ``regularization()`` returns ``lambda * alpha^2``, which the
            LightningModule adds to its loss (see :func:`regularization_loss`); the
            TaskModule's optimizer puts alpha, like every quantizer parameter, in a group
            without weight decay (:meth:`qtrain.modules.base.TaskModule.param_groups`).
    """

    min_bits, max_bits = 1, 8

    def __init__(self, bits: int = 4, alpha_init: float | str = 10.0, l2_decay: float = 0.0,
                 calib_percentile: float = 99.9) -> None:
        super().__init__(bits)
        if alpha_init == "calibrate":
            alpha_init = float("nan")
        elif isinstance(alpha_init, str) or not alpha_init > 0:
            raise ValueError(f"PACTQuantizer: alpha_init must be > 0 or 'calibrate', got "
                             f"{alpha_init!r}")
        if not 0 < calib_percentile <= 100:
            raise ValueError(f"PACTQuantizer: calib_percentile must be in (0, 100], got "
                             f"{calib_percentile}")
        if l2_decay < 0:
            raise ValueError(f"PACTQuantizer: l2_decay must be >= 0, got {l2_decay}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.l2_decay = l2_decay
        self.calib_percentile = float(calib_percentile)
        self._alpha_set = False  # checked once (a host sync), not on every step

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        flat = flat[:: max(1, flat.numel() // (1 << 22))]  # torch.quantile's size limit
        a = torch.quantile(flat, self.calib_percentile / 100)
        self.alpha.copy_(a.clamp_min(_EPS))

    def _alpha_is_set(self) -> bool:
        if not self._alpha_set:
            self._alpha_set = not bool(torch.isnan(self.alpha))
        return self._alpha_set

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self._alpha_is_set():  # alpha_init="calibrate": the first quantized batch
            self._calibrate(x)
            self._alpha_set = True
        return _PACTFn.apply(x, self.alpha, float(2**self.bits - 1))

    def regularization(self) -> torch.Tensor:
        if not self._alpha_is_set():  # not calibrated yet (quantizer not used so far)
            return self.alpha.new_zeros(())
        return self.l2_decay * self.alpha**2

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + 32

    def extra_repr(self) -> str:
        return f"bits={self.bits}, l2_decay={self.l2_decay}, enabled={self.enabled}"


class _LSQFn(torch.autograd.Function):
    """LSQ (Esser 2020) eqs. (1)-(3): v = x/s, x_hat = round(clamp(v, -Qn, Qp)) s.
    dx_hat/dx = 1 for -Qn < v < Qp else 0;  dx_hat/ds = round(v) - v inside, -Qn for
    v <= -Qn, Qp for v >= Qp; the step gradient is multiplied by ``grad_scale`` (sec. 2.2)."""

    @staticmethod
    def forward(ctx, x, s, qn, qp, grad_scale):
        s_ = s.clamp_min(_EPS)
        v = x / s_
        ctx.save_for_backward(v)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.s_shape = qn, qp, grad_scale, s.shape
        return torch.round(v.clamp(-qn, qp)) * s_

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        below, above = v <= -qn, v >= qp
        inside = ~(below | above)
        ds = torch.where(inside, torch.round(v) - v, torch.where(below, -qn, qp).to(v.dtype))
        grad_s = (g * ds).sum().reshape(ctx.s_shape) * ctx.grad_scale
        return g * inside, grad_s, None, None, None


class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2020), per-tensor step ``s``.

    Args:
        bits: signed 2..8 (Qn = 2^(b-1), Qp = 2^(b-1) - 1) or unsigned 1..8 (Qn = 0,
            Qp = 2^b - 1).
        signed: True for weights, False for post-ReLU activations.
        role: 'weight' -> N = numel (N_W); 'activation' -> N = numel / batch (N_F, features per
            sample). Gradient scale g = 1 / sqrt(N Qp) (sec. 2.2).
        init_step: fixed initial step; by default s = 2 mean|x| / sqrt(Qp) from the first
            forward (sec. 2.1; the paper uses the first batch for activations).
    """

    min_bits, max_bits = 1, 8

    def __init__(
        self, bits: int = 4, signed: bool = True, role: str = "weight",
        init_step: float | None = None,
    ) -> None:
        if role not in ("weight", "activation"):
            raise ValueError(f"LSQQuantizer: role={role!r}; allowed: 'weight', 'activation'")
        self.signed = signed
        super().__init__(bits)
        self.role = role
        self.step = nn.Parameter(torch.tensor(1.0 if init_step is None else float(init_step)))
        self.register_buffer("initialized", torch.tensor(init_step is not None))

    def _check_bits(self, bits: int) -> int:
        bits = super()._check_bits(bits)
        if self.signed and bits < 2:
            raise ValueError(f"LSQQuantizer: signed needs bits >= 2 (allowed 2..8), got {bits}")
        return bits

    @property
    def qn_qp(self) -> tuple[int, int]:
        if self.signed:
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def grad_scale(self, x: torch.Tensor) -> float:
        n = x.numel() if self.role == "weight" or x.dim() < 2 else x.numel() // x.shape[0]
        return 1.0 / math.sqrt(n * self.qn_qp[1])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qn_qp
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_((2 * x.detach().abs().mean() / math.sqrt(qp)).clamp_min(_EPS))
                self.initialized.fill_(True)
        return _LSQFn.apply(x, self.step, qn, qp, self.grad_scale(x))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + 32

    @torch.no_grad()
    def export_qparams(self, weight: torch.Tensor) -> dict:
        """Codes and step of a signed LSQ weight for packing (qtrain.export): the forward's
        ``round(clamp(w / s, -Qn, Qp))`` as symmetric uniform codes with one fp32 scale s, so
        ``codes * s`` is the fake-quantized weight exactly."""
        if not self.signed:
            raise ValueError("LSQQuantizer.export_qparams: only signed (weight) LSQ packs as "
                             "the symmetric uniform format")
        if not bool(self.initialized):
            self.quantize(weight)  # the step's data-dependent initialisation (sec. 2.1)
        qn, qp = self.qn_qp
        s = self.step.detach().clamp_min(_EPS)
        codes = torch.round((weight.detach() / s).clamp(-qn, qp)).to(torch.int32)
        return dict(codes=codes, scale=s.float(), zero_point=torch.zeros((), dtype=torch.int32),
                    bits=self.bits, symmetric=True, granularity="tensor", group_size=None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, role={self.role}, enabled={self.enabled}"


class DSQQuantizer(Quantizer):
    """Differentiable Soft Quantization (Gong et al. 2019), eqs. (3)-(5).

    On the clipping range [l, u] with Delta = (u - l) / (2^b - 1), interval P_i with midpoint
    m_i = l + (i + 1/2) Delta:  phi(x) = s tanh(k (x - m_i)),  k = log(2/alpha - 1) / Delta,
    s = 1 / tanh(k Delta / 2) (= 1 / (1 - alpha));  Q_S(x) = l + Delta (i + (phi(x) + 1) / 2),
    l below l and u above u. alpha -> 0 makes Q_S the hard uniform quantizer.

    Forward (default, ``ste_forward=True``): the hard value ``l + Delta (i + (sgn(phi(x)) + 1)
    / 2)`` = ``l + Delta round((clip(x) - l) / Delta)`` -- the paper's "sign operation" that turns
    DSQ into the standard uniform quantizer (its Fig. 1) -- with Q_S's gradient in the backward
    (d sgn / d phi taken as 1), so training sees the network that is evaluated and deployed;
    x, alpha, l and u all get DSQ's gradients. This is the published re-implementations' forward
    (a sign with an identity gradient applied to phi); the paper's own code is not public.
    ``ste_forward=False`` (a named option) trains with the soft values Q_S themselves: then
    nothing pulls alpha down, and measured it is not a usable method -- CIFAR-10 ResNet-20 W2A2
    fine-tuned from FP32 (86.8%), 120 batches: the learned alphas rose from 0.2 towards 0.5 (an
    almost linear Q_S) and the hard-quantized network scored 10.1% (chance) vs 51.2% with the
    default; 3 epochs: 10.25% test (train loss 0.23). Eval, ``hard=True`` or alpha <
    ``hard_threshold`` always use the hard value (then the gradient w.r.t. x is the STE).
    alpha is learnable and clamped to [1e-6, 0.5]; :meth:`anneal` sets it. l and u are
    learnable; by default initialised to min(x) and max(x) of the first forward.
    """

    min_bits, max_bits = 1, 8

    def __init__(
        self, bits: int = 2, alpha_init: float = 0.2, lower: float | None = None,
        upper: float | None = None, hard: bool = False, hard_threshold: float = 0.0,
        ste_forward: bool = True,
    ) -> None:
        super().__init__(bits)
        if not 0 < alpha_init <= 0.5:
            raise ValueError(f"DSQQuantizer: alpha_init must be in (0, 0.5], got {alpha_init}")
        if (lower is None) != (upper is None) or (lower is not None and not lower < upper):
            raise ValueError(f"DSQQuantizer: need both lower < upper or neither, got "
                             f"lower={lower}, upper={upper}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.lower = nn.Parameter(torch.tensor(0.0 if lower is None else float(lower)))
        self.upper = nn.Parameter(torch.tensor(1.0 if upper is None else float(upper)))
        self.register_buffer("initialized", torch.tensor(lower is not None))
        self.hard, self.hard_threshold, self.ste_forward = hard, hard_threshold, ste_forward

    @torch.no_grad()
    def anneal(self, alpha: float) -> None:
        if not 0 < alpha <= 0.5:
            raise ValueError(f"DSQQuantizer.anneal: alpha must be in (0, 0.5], got {alpha}")
        self.alpha.fill_(alpha)

    def _range(self, x: torch.Tensor):
        if not bool(self.initialized):
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                self.lower.copy_(lo)
                self.upper.copy_(torch.maximum(hi, lo + 1e-6))
                self.initialized.fill_(True)
        n = 2**self.bits - 1
        delta = (self.upper - self.lower).clamp_min(1e-6) / n
        xc = torch.minimum(torch.maximum(x, self.lower), self.upper)
        return xc, delta, n

    def soft(self, x: torch.Tensor) -> torch.Tensor:
        """Q_S(x) (eq. 5)."""
        xc, delta, n = self._range(x)
        i = torch.floor((xc - self.lower) / delta).clamp(0, n - 1).detach()
        a = self.alpha.clamp(1e-6, 0.5)
        k = torch.log(2.0 / a - 1.0) / delta
        s = 1.0 / torch.tanh(0.5 * k * delta)
        phi = s * torch.tanh(k * (xc - (self.lower + (i + 0.5) * delta)))
        return self.lower + delta * (i + (phi + 1.0) / 2.0)

    def hard_value(self, x: torch.Tensor) -> torch.Tensor:
        xc, delta, _ = self._range(x)
        return self.lower + delta * E.ste_round((xc - self.lower) / delta)

    def use_hard(self) -> bool:
        return (
            self.hard or not self.training
            or (self.hard_threshold > 0 and float(self.alpha.detach()) < self.hard_threshold)
        )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_hard():
            return self.hard_value(x)
        q = self.soft(x)
        if self.ste_forward:
            return q + (self.hard_value(x) - q).detach()
        return q

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + 64  # codes + fp32 l and u (alpha: training only)


SIGMA_UNITS = ("absolute", "variance")


class SoftToHardVQ(Quantizer):
    """Soft-to-hard vector quantization (Agustsson et al. 2017, "Soft-to-Hard Vector
    Quantization for End-to-End Learning Compressible Representations", NeurIPS, sec. 3).

    The tensor is split into sub-vectors z of ``dim`` consecutive elements along each row
    (a weight (out, in, ...) is viewed as (out, -1)); L = 2^bits learnable centers c_j.
    Soft assignment phi(z) = softmax(-sigma ||z - c_j||^2)_j over j, soft quantization
    Q~(z) = sum_j phi_j(z) c_j, hard quantization Q^(z) = the nearest c_j. Forward uses Q^,
    backward the gradient of Q~ (the paper's stop-gradient form
    z^ = Q~ + stop_gradient(Q^ - Q~)). ``sigma`` is annealed upward with :meth:`anneal`
    (:class:`qtrain.callbacks.soft_to_hard_vq.SoftToHardVQCallback` schedules it).

    Rate: :meth:`soft_entropy` is the paper's histogram estimate of the entropy of the code
    symbols, H~ = H(p, q~) = -sum_j p_j log2 q~_j, with p the histogram of the hard
    assignments (a constant) and q~_j = mean_z phi_j(z) the soft histogram (differentiable);
    H(p, q~) = H(p) + KL(p || q~) >= H(p), in bits per sub-vector (section 3, the soft entropy
    estimate; equation numbers not re-verified). :meth:`hard_entropy` is H(p).

    ``hard`` (a buffer, so a resumed run keeps it): sigma = infinity, forward *and* backward
    use Q^ (the weights get no gradient through the quantizer; the centers get the summed
    gradient of their sub-vectors): the end of training, where the assignments are hard.

    ``sigma_units``: 'absolute' (the paper: sigma multiplies ||z - c||^2 as is) or 'variance'
    (ours, a named option: ||z - c||^2 is divided by the variance of the layer's sub-vector
    entries measured when the centers are initialised, so one sigma schedule fits layers
    of different weight scales; the factor is the ``d2_scale`` buffer).

    Centers are initialised on the first forward to L distinct sub-vectors drawn with
    ``seed`` (needs at least L sub-vectors). Memory: one (num_subvectors x L) distance matrix.
    """

    min_bits, max_bits = 1, 12

    def __init__(self, bits: int = 4, dim: int = 1, sigma: float = 1.0, seed: int = 0,
                 sigma_units: str = "absolute") -> None:
        super().__init__(bits)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"SoftToHardVQ: dim must be a positive int, got {dim!r}")
        if not sigma > 0:
            raise ValueError(f"SoftToHardVQ: sigma must be > 0, got {sigma}")
        if sigma_units not in SIGMA_UNITS:
            raise ConfigError(f"SoftToHardVQ: sigma_units={sigma_units!r}; allowed: {SIGMA_UNITS}")
        self.dim, self.seed, self.sigma_units = dim, seed, sigma_units
        self.centers = nn.Parameter(torch.zeros(2**bits, dim))
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("hard", torch.tensor(False))
        self.register_buffer("d2_scale", torch.tensor(1.0))

    @torch.no_grad()
    def anneal(self, sigma: float) -> None:
        if not sigma > 0:
            raise ValueError(f"SoftToHardVQ.anneal: sigma must be > 0, got {sigma}")
        self.sigma.fill_(sigma)

    @torch.no_grad()
    def set_hard(self, flag: bool = True) -> None:
        self.hard.fill_(bool(flag))

    def subvectors(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
        if rows.shape[1] % self.dim:
            raise ValueError(f"SoftToHardVQ: dim={self.dim} does not divide the row length "
                             f"{rows.shape[1]} of a tensor of shape {tuple(x.shape)}")
        return rows.reshape(-1, self.dim)

    def sq_distances(self, z: torch.Tensor) -> torch.Tensor:
        c = self.centers
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ c.t() + (c * c).sum(1)
        return d2.clamp_min(0.0)

    def _init_centers(self, z: torch.Tensor) -> None:
        L = self.centers.shape[0]
        if z.shape[0] < L:
            raise ValueError(f"SoftToHardVQ: {z.shape[0]} sub-vectors < {L} centers "
                             f"(bits={self.bits}); lower bits or dim")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(z.shape[0], generator=g)[:L].to(z.device)
        with torch.no_grad():
            self.centers.copy_(z.detach()[pick])
            if self.sigma_units == "variance":
                var = float(z.detach().float().var())
                self.d2_scale.fill_(1.0 / var if var > 0 else 1.0)
            self.initialized.fill_(True)

    def assignments(self, z: torch.Tensor, d2: torch.Tensor | None = None) -> torch.Tensor:
        """phi(z): (num_subvectors, L) soft assignments, softmax(-sigma ||z - c_j||^2)."""
        d2 = self.sq_distances(z) if d2 is None else d2
        return torch.softmax(-(self.sigma * self.d2_scale) * d2, dim=1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        z = self.subvectors(x)
        if not bool(self.initialized):
            self._init_centers(z)
        d2 = self.sq_distances(z)
        hard = self.centers[d2.argmin(dim=1)]
        if bool(self.hard):
            return hard.reshape(x.shape)
        soft = self.assignments(z, d2) @ self.centers
        return (soft + (hard - soft).detach()).reshape(x.shape)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Index of the nearest center per sub-vector (rows of sub-vectors per output row)."""
        z = self.subvectors(weight)
        if not bool(self.initialized):
            self._init_centers(z)
        rows = 1 if weight.dim() < 2 else weight.shape[0]
        return self.sq_distances(z).argmin(dim=1).reshape(rows, -1)

    def soft_entropy(self, x: torch.Tensor) -> torch.Tensor:
        """H(p, q~) in bits per sub-vector (class docstring); differentiable in ``x`` and the
        centers through q~."""
        z = self.subvectors(x)
        if not bool(self.initialized):
            self._init_centers(z)
        d2 = self.sq_distances(z)
        L = self.centers.shape[0]
        p = torch.bincount(d2.argmin(dim=1), minlength=L).to(z.dtype) / z.shape[0]
        q = self.assignments(z, d2).mean(0)
        used = p > 0  # q~_j >= phi_j(z) / N > 0 wherever p_j > 0 (argmin has the largest phi)
        return -(p[used] * torch.log2(q[used])).sum()

    @torch.no_grad()
    def hard_entropy(self, x: torch.Tensor) -> torch.Tensor:
        """H(p): the empirical entropy of the hard code symbols, bits per sub-vector."""
        c = torch.bincount(self.codes(x).reshape(-1), minlength=self.centers.shape[0]).double()
        p = c[c > 0] / c.sum()
        return -(p * torch.log2(p)).sum()

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * (weight.numel() // self.dim) + 32 * self.centers.numel()

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, dim={self.dim}, sigma={float(self.sigma)}, "
                f"sigma_units={self.sigma_units}, hard={bool(self.hard)}")
