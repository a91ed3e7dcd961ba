"""Differentiable quantization (Polino, Pascanu & Alistarh 2018, "Model compression via
distillation and quantization", ICLR, sec. 2.2 / Algorithm 2).

A weight tensor is flattened and cut into buckets of ``bucket_size`` consecutive elements (256
in the paper; the last, shorter bucket is padded with copies of the last element, which leaves
its min and max unchanged -- the authors' ``create_bucket_tensor``). Each bucket v is scaled to
[0, 1] with its own alpha = max(v) - min(v), beta = min(v) (sec. 2.1, the "linear" scaling
function; a constant bucket gets alpha = 1, as the authors' code). One set of n = 2^bits
*learned* points p_1..p_n in [0, 1] is shared by all buckets of the tensor; each weight maps to
the point nearest its scaled value and is rescaled with its own bucket's alpha, beta:

    Q(w_i) = alpha_b(i) * p_j(i) + beta_b(i),   j(i) = argmin_j |(w_i - beta_b(i)) / alpha_b(i) - p_j|

so a bucket with a tiny range and a bucket with a huge range both use all n levels. The
gradient of a point is d L / d p_j = sum over the weights i assigned to p_j of
alpha_b(i) * dL/dQ(w_i) (the authors' ``nonUniformQuantization_variable.backward``; here the
autograd of the product above). Only the points are learned (Algorithm 2 keeps the weights
fixed): the weight gets no gradient unless ``ste=True`` (our option: straight-through
gradient to the float weight; alpha / beta then follow the weight). The points are re-sorted
after every optimizer step (the paper; :class:`qtrain.callbacks.polino.PolinoResortCallback`,
which also permutes the optimizer's per-point state -- the authors' code sorts only the points).

Initialisation (the authors' ``initialize_quantization_points``, ``initialize_method=
'quantiles'``): the percentiles ``linspace(0, 100, n)`` of all scaled values of the tensor
(padding excluded; numpy's linear interpolation), so the first and last points start at 0 and
1. ``init='uniform'`` (the authors' other option): p_j = j / (n - 1).
Ties (a scaled value exactly half-way between two points) go to the upper point, as the
authors' ``np.searchsorted`` + strict ``<`` test.

Options (named, not the paper's default): ``bucket_size=None`` -- one bucket for the whole
tensor (the authors' ``bucket_size=None``: alpha, beta = the tensor's own range).
Storage: ``bits`` per weight + fp32 points + fp32 alpha and beta per bucket.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer

INITS = ("quantiles", "uniform")
_TOL_ZERO = 1e-10  # the authors' ScalingFunction.tol_diff_zero


def bucket_scale(x: torch.Tensor, bucket_size: int | None):
    """Min-max scaling per bucket (module doc): returns ``(s, alpha, beta)`` with ``s`` the
    scaled values (n_buckets, bucket_size) of the flattened, padded tensor in [0, 1] and
    ``alpha``, ``beta`` (n_buckets, 1). No gradient path (computed from ``x.detach()``)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    bs = n if bucket_size is None else bucket_size
    pad = -(-n // bs) * bs - n
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    v = flat.reshape(-1, bs)
    beta = v.amin(dim=1, keepdim=True)
    alpha = v.amax(dim=1, keepdim=True) - beta
    alpha = torch.where(alpha < _TOL_ZERO, torch.ones_like(alpha), alpha)
    return (v - beta) / alpha, alpha, beta


def nearest_points(s: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index into ``points`` (any order) of the point nearest each element of ``s``; ties go
    to the larger point."""
    p, perm = points.detach().sort()
    mids = ((p[1:] + p[:-1]) / 2).contiguous()
    return perm[torch.bucketize(s.contiguous(), mids, right=True)]


def percentile_init(s: torch.Tensor, n: int) -> torch.Tensor:
    """``np.percentile(s, linspace(0, 100, n))`` (linear interpolation), any size of ``s``."""
    v = s.detach().reshape(-1).double().sort().values
    pos = torch.linspace(0, 1, n, dtype=torch.float64, device=v.device) * (v.numel() - 1)
    lo = pos.floor().long().clamp_max(v.numel() - 1)
    hi = (lo + 1).clamp_max(v.numel() - 1)
    return (v[lo] + (pos - lo) * (v[hi] - v[lo])).float()


class PolinoDifferentiableQuantizer(Quantizer):
    """Polino 2018 differentiable quantization (module docstring).

    Args:
        bits: 1..8 (n = 2^bits learned points, shared by the tensor's buckets).
        bucket_size: elements per bucket (paper: 256); None: the whole tensor is one bucket.
        ste: also pass the straight-through gradient to the float weight (not the paper's).
        init: 'quantiles' (authors' default) | 'uniform'.
    """

    min_bits, max_bits = 1, 8

    def __init__(self, bits: int = 2, bucket_size: int | None = 256, ste: bool = False,
                 init: str = "quantiles") -> None:
        super().__init__(bits)
        if bucket_size is not None and (isinstance(bucket_size, bool)
                                        or not isinstance(bucket_size, int) or bucket_size < 1):
            raise ConfigError(f"PolinoDifferentiableQuantizer: bucket_size={bucket_size!r}; "
                              "allowed: an int >= 1 (paper: 256) or null (one bucket per tensor)")
        if init not in INITS:
            raise ConfigError(f"PolinoDifferentiableQuantizer: init={init!r}; allowed: {INITS}")
        self.bucket_size, self.ste, self.init = bucket_size, ste, init
        self.points = nn.Parameter(torch.zeros(2**bits))
        self.register_buffer("initialized", torch.tensor(False))

    def set_bits(self, bits: int) -> None:
        super().set_bits(bits)
        self.points = nn.Parameter(torch.zeros(2**bits, device=self.points.device))
        self.initialized.fill_(False)

    def scale(self, x: torch.Tensor):
        """``(s, alpha, beta)`` of :func:`bucket_scale` with this quantizer's bucket size."""
        return bucket_scale(x, self.bucket_size)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        n = self.points.numel()
        if self.init == "uniform":
            init = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
        else:
            s, _, _ = self.scale(x)
            init = percentile_init(s.reshape(-1)[:x.numel()], n)
        self.points.copy_(init.to(self.points.device))
        self.initialized.fill_(True)

    def assignments(self, x: torch.Tensor) -> torch.Tensor:
        """Index (into ``points``) of every element's nearest point, shape of ``x``."""
        s, _, _ = self.scale(x)
        return nearest_points(s, self.points).reshape(-1)[:x.numel()].reshape(x.shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        s, alpha, beta = self.scale(x)
        idx = nearest_points(s, self.points)
        q = self.points[idx] * alpha + beta  # d/dp_j = sum of alpha_b g over p_j's weights
        out = q.reshape(-1)[:x.numel()].reshape(x.shape).to(x.dtype)
        return out + (x - x.detach()) if self.ste else out

    @torch.no_grad()
    def resort(self) -> None:
        self.points.copy_(self.points.sort().values)

    def num_buckets(self, numel: int) -> int:
        return 1 if self.bucket_size is None else -(-numel // self.bucket_size)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return (self.bits * weight.numel() + 32 * self.points.numel()
                + 64 * self.num_buckets(weight.numel()))

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, bucket_size={self.bucket_size}, ste={self.ste}, "
                f"init={self.init}, enabled={self.enabled}")
