"""Weight quantizer applying Merolla et al. 2016's projections / distortions
(:mod:`qtrain.quant.distortions`) BinaryConnect-style: the forward pass uses the projected
weight P(w), the gradient with respect to P(w) updates the float weight w (identity
straight-through estimator, Courbariaux et al. 2015 Algorithm 1; the paper trains its
projections this way); the float weight itself is never overwritten.

A training projection (``train``, used while the module is in training mode: a new random
draw every training forward, i.e. every step) and a test projection (``test``, evaluation
mode: validation and test) are set independently, so a network can be trained with one
projection and tested with another, or trained in float and only tested distorted
(``train.projection=none``). A stochastic test distortion is drawn once per weight version
(the same distorted network for every batch of an evaluation; a new draw after the weights
change), from a seed of its own per layer.

Projection spec (dict; ``quant.train.*`` / ``quant.test.*`` in the config): ``projection``
(:data:`PROJECTION_NAMES`), ``levels`` (kquant), ``beta`` (power), ``clip`` (clip),
``sigma`` (mult_noise / add_noise), ``gamma`` (stochastic_multiply: the paper's stochastic
projection rule, u ~ U[gamma, 1 / gamma]), ``rounding`` (kquant: nearest | stochastic), and for
``projection: mixture`` (our option, training only): ``rule`` (the projection it applies),
``p`` (its probability per step) and ``granularity`` (layer | weight).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import distortions as D
from qtrain.quant.rounding import ROUNDING_MODES, derive_seed

PROJECTION_NAMES = D.PROJECTIONS + ("mixture",)
SPEC_KEYS = ("projection", "levels", "beta", "clip", "sigma", "gamma", "rounding", "rule", "p",
             "granularity")
SCALE_BITS = 32  # one fp32 alpha per layer


class _StraightThrough(torch.autograd.Function):
    """Forward: the projected weight exactly; backward: its gradient to the float weight."""

    @staticmethod
    def forward(ctx, w, target):
        return target.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


@dataclass(frozen=True)
class ProjectionSpec:
    projection: str = "none"
    levels: int = 3
    beta: float = 0.5
    clip: float = 1.0
    sigma: float = 0.5
    gamma: float = 0.5
    rounding: str = "nearest"
    rule: str = "binary"
    p: float = 0.5
    granularity: str = "layer"

    @classmethod
    def from_config(cls, cfg, key: str, allow_rule: bool = True) -> ProjectionSpec:
        """Validated spec from a dict (or a projection name); ``key`` names it in errors."""
        if cfg is None:
            cfg = {}
        if isinstance(cfg, str):
            cfg = {"projection": cfg}
        cfg = dict(cfg)
        extra = sorted(set(cfg) - set(SPEC_KEYS))
        if extra:
            raise ConfigError(f"{key}: keys {extra} unknown; allowed: {list(SPEC_KEYS)}")
        s = cls(**cfg)
        names = PROJECTION_NAMES if allow_rule else D.PROJECTIONS
        if s.projection not in names:
            raise ConfigError(f"{key}.projection={s.projection!r}; allowed: {list(names)}"
                              + ("" if allow_rule else " (mixture is training-only)"))
        if s.rule not in D.PROJECTIONS or s.rule == "none":
            raise ConfigError(f"{key}.rule={s.rule!r}; allowed: "
                              f"{[p for p in D.PROJECTIONS if p != 'none']}")
        try:
            D.check_levels(s.levels)
        except ValueError as e:
            raise ConfigError(f"{key}.levels: {e}") from None
        checks = (("beta", s.beta >= 0, ">= 0"), ("clip", s.clip > 0, "> 0"),
                  ("sigma", s.sigma >= 0, ">= 0"), ("p", 0 <= s.p <= 1, "in [0, 1]"),
                  ("gamma", 0 < s.gamma < 1, "0 < gamma < 1"))
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}.{name}={getattr(s, name)}; allowed: {allowed}")
        if s.rounding not in ROUNDING_MODES[:2]:
            raise ConfigError(f"{key}.rounding={s.rounding!r}; allowed: {list(ROUNDING_MODES[:2])}")
        if s.granularity not in D.GRANULARITIES:
            raise ConfigError(f"{key}.granularity={s.granularity!r}; allowed: {list(D.GRANULARITIES)}")
        return s

    @property
    def base(self) -> str:
        """The projection actually applied (the rule's for a mixture)."""
        return self.rule if self.projection == "mixture" else self.projection

    @property
    def random(self) -> bool:
        return (self.projection == "mixture" or self.projection in D.STOCHASTIC
                or (self.projection == "kquant" and self.rounding == "stochastic"))

    @property
    def discrete(self) -> bool:
        return self.projection in ("binary", "stochastic_binary", "kquant")

    def apply(self, w: torch.Tensor, scale: str, generator=None) -> torch.Tensor:
        out = D.project(w, self.base, scale=scale, levels=self.levels, beta=self.beta,
                        clip_value=self.clip, sigma=self.sigma, gamma=self.gamma,
                        rounding=self.rounding, generator=generator)
        if self.projection == "mixture":
            out = D.stochastic_mixture(w, out, self.p, self.granularity, generator)
        return out


class WeightDistortionQuantizer(Quantizer):
    """Args:
        bits: unused by the projections (kept for the quantizer interface); storage follows
            the test projection (:meth:`storage_bits`).
        train / test: projection specs (module docstring); ``test=None``: the training
            projection (a mixture's own projection for ``mixture``).
        scale: alpha_k of the normalizing projections: max_abs | mean_abs | none.
        seed: base seed of the random draws (the QAT callback derives one per layer); None:
            PyTorch's global generator.
    """

    min_bits, max_bits = 1, 32

    def __init__(self, bits: int = 32, train=None, test=None, scale: str = "max_abs",
                 seed: int | None = None) -> None:
        super().__init__(bits)
        self.train_spec = ProjectionSpec.from_config(train, "quant.train")
        if test is None:
            test = {**asdict(self.train_spec), "projection": self.train_spec.base}
        self.test_spec = ProjectionSpec.from_config(test, "quant.test", allow_rule=False)
        if scale not in D.SCALES:
            raise ConfigError(f"quant.scale={scale!r}; allowed: {list(D.SCALES)}")
        self.scale, self.seed = scale, seed
        self.bits = self.code_bits()  # what a stored weight takes (the size reports read it)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._cache_key, self._cache = None, None

    def _generator(self, w: torch.Tensor, *keys: str):
        if self.seed is None:
            return None
        g = torch.Generator(device=w.device)
        g.manual_seed(derive_seed(self.seed, *keys))
        return g

    def test_generator(self, w: torch.Tensor):
        """The generator of the evaluation draw (the same draw every time it is made)."""
        return self._generator(w, "test")

    def projected(self, w: torch.Tensor) -> torch.Tensor:
        """P(w) without the gradient rule: training draw (advancing the step) or the cached
        test draw."""
        if self.training:
            g = self._generator(w, "train", str(int(self.step)))
            self.step += 1
            return self.train_spec.apply(w.detach(), self.scale, g)
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._cache_key != key or self._cache is None:
            self._cache = self.test_spec.apply(w.detach(), self.scale, self.test_generator(w))
            self._cache_key = key
        return self._cache

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and self.train_spec.projection == "none":
            self.step += 1
            return w
        return _StraightThrough.apply(w, self.projected(w))  # forward P(w), gradient to w

    def effective_bits(self, w: torch.Tensor) -> float:
        """Effective bits per weight of ``w`` under the test projection (the same draw as
        the evaluation's)."""
        s = self.test_spec
        return D.effective_bits(w, s.projection, scale=self.scale, levels=s.levels,
                                sigma=s.sigma, gamma=s.gamma, rounding=s.rounding,
                                generator=self.test_generator(w))

    def code_bits(self) -> int:
        """Bits of one stored weight under the test projection: 1 (binary), ceil(log2 k)
        (kquant), else 32 (float weights)."""
        s = self.test_spec
        if s.projection in ("binary", "stochastic_binary"):
            return 1
        if s.projection == "kquant":
            return math.ceil(math.log2(s.levels))
        return 32

    def set_bits(self, bits: int) -> None:
        raise ConfigError("WeightDistortionQuantizer: the bit width follows quant.test "
                          "(projection / levels); it cannot be set per layer")

    def storage_bits(self, weight: torch.Tensor) -> int:
        """:meth:`code_bits` per weight, + one fp32 alpha for the discrete projections."""
        b = self.code_bits()
        return b * weight.numel() + (SCALE_BITS if b < 32 else 0)

    @property
    def codes(self):
        """``codes(weight)`` (integer level index of the test projection's draw) for the
        discrete test projections; None otherwise (no codes to entropy-code)."""
        return self._codes if self.enabled and self.test_spec.discrete else None

    def _codes(self, weight: torch.Tensor) -> torch.Tensor:
        s, w = self.test_spec, weight.detach()
        alpha = D.layer_scale(w, self.scale)
        if s.projection == "kquant":
            return D.kquant_codes(w, alpha, s.levels, s.rounding,
                                  self.test_generator(w)).to(torch.int32)
        b = w >= 0 if s.projection == "binary" else \
            D.stochastic_binarize(w, alpha, self.test_generator(w)) > 0
        return b.to(torch.int32)

    def extra_repr(self) -> str:
        return (f"train={self.train_spec.projection}, test={self.test_spec.projection}, "
                f"scale={self.scale}, enabled={self.enabled}")
