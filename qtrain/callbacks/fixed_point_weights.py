"""Fixed-point weight storage with rounded updates (Gupta et al. 2015) as a Lightning callback.

Gupta, Agrawal, Gopalakrishnan & Narayanan 2015, "Deep Learning with Limited Numerical
Precision" (ICML), Sec. 3-4: the network's weights and biases *are* fixed-point numbers in
<IL, FL> (step eps = 2^-FL, range [-2^(IL-1), 2^(IL-1) - eps]); the SGD update is computed and
the new weight is converted back into <IL, FL> with round-to-nearest (eq. 1) or stochastic
rounding (eq. 2), saturating (eq. 3):

    w <- Convert(w - lr * dL/dw, <IL, FL>)

There is no FP32 master copy. This is where the rounding mode matters most (the paper's
Fig. 2 / Sec. 4.1 argument): with round-to-nearest an update smaller than eps/2 is lost every
step, so training stalls once the updates shrink below the grid; stochastic rounding keeps
them in expectation (E[Convert(x)] = x).

:class:`FixedPointWeightStorage` rounds the ``params`` (weight, bias) of the selected layers
in place at the start of training and after every optimizer step (a post-step hook on each
live optimizer, :func:`qtrain.callbacks.optimizer_hooks.hook_optimizer_steps`). With plain SGD
(no momentum, no weight decay: the paper's MNIST setting) the stored value is exactly
Convert(w - lr g). Layers are chosen with :func:`qtrain.nn.convert.select_modules` (names
relative to the network). The stochastic-rounding generator is seeded with ``seed`` and its
state is saved in the checkpoint (a resumed run continues the same random stream).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks.optimizer_hooks import hook_optimizer_steps
from qtrain.errors import ConfigError
from qtrain.nn import convert as C
from qtrain.quant.fixed_point import check_fixed_format, fixed_range
from qtrain.quant.rounding import check_rounding, round_values

log = logging.getLogger(__name__)
LAYER_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}
PARAMS = ("weight", "bias")


class FixedPointWeightStorage(pl.Callback):
    """Args:
        bits: word length WL = IL + FL (16 in the paper).
        frac_bits: FL (the paper's MNIST sweep: 14, 10, 8).
        rounding: 'stochastic' (eq. 2, the paper's method) | 'nearest' (eq. 1) | 'truncate'.
        seed: seeds the stochastic-rounding generator (None: the global RNG).
        include / exclude: layer-name regexes (relative to the network).
        types: layer types among Linear, Conv2d.
        params: which parameters of each layer are stored in fixed point (weight, bias).
        start_epoch: epochs of float training before the weights are put on the grid.
    """

    def __init__(self, bits: int = 16, frac_bits: int = 14, rounding: str = "stochastic",
                 seed: int | None = None, include: list[str] = (".*",), exclude: list[str] = (),
                 types: list[str] = ("Linear", "Conv2d"), params: list[str] = PARAMS,
                 start_epoch: int = 0) -> None:
        super().__init__()
        if not isinstance(bits, int) or not isinstance(frac_bits, int):
            raise ConfigError(f"fixed-point weights: bits={bits!r} and frac_bits={frac_bits!r} "
                              "must be ints")
        check_fixed_format(bits - frac_bits, frac_bits,
                           "fixed-point weights (IL = bits - frac_bits, FL = frac_bits)")
        try:
            self.rounding = check_rounding(rounding, "fixed-point weights rounding")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"fixed-point weights types: {bad} unknown; allowed: {sorted(LAYER_TYPES)}")
        badp = [p for p in params if p not in PARAMS]
        if badp or not params:
            raise ConfigError(f"fixed-point weights params: {list(params)}; allowed: a non-empty "
                              f"subset of {PARAMS}")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError(f"fixed-point weights start_epoch={start_epoch!r}: an int >= 0")
        self.int_bits, self.frac_bits = bits - frac_bits, frac_bits
        self.lo, self.hi = fixed_range(self.int_bits, self.frac_bits)
        self.seed, self.start_epoch = seed, start_epoch
        self.include, self.exclude = C.as_patterns(include), C.as_patterns(exclude)
        self.types = tuple(LAYER_TYPES[t] for t in types)
        self.params = tuple(params)
        self.tensors: dict[str, torch.Tensor] = {}
        self._hooked: dict = {}
        self._gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None
        self.saturated = 0  # parameter elements clamped to the range ends in the last rounding

    # -- the conversion ------------------------------------------------------------
    def _generator(self, device) -> torch.Generator | None:
        if self.rounding != "stochastic" or self.seed is None:
            return None
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device).manual_seed(int(self.seed))
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
        return self._gen

    @torch.no_grad()
    def round_now(self) -> None:
        """Every selected parameter <- Convert(parameter, <IL, FL>), in place."""
        eps = 2.0 ** -self.frac_bits
        sat = 0
        for t in self.tensors.values():
            q = round_values(t / eps, self.rounding, self._generator(t.device)) * eps
            sat += int(((q < self.lo) | (q > self.hi)).sum())
            t.copy_(q.clamp_(self.lo, self.hi))
        self.saturated = sat

    def select(self, model: nn.Module) -> dict[str, torch.Tensor]:
        chosen = C.select_modules(model, self.include, self.exclude, self.types,
                                  key="extra_callbacks fixed-point weights")
        out = {}
        for name, m in chosen.items():
            for p in self.params:
                t = getattr(m, p, None)
                if isinstance(t, torch.Tensor):
                    out[f"{name}.{p}"] = t
        return out

    def _active(self, trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch

    # -- Lightning hooks -------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.tensors = self.select(pl_module)
        log.info("fixed-point weights <%d, %d> (%s rounding): %d tensors, %d elements",
                 self.int_bits, self.frac_bits, self.rounding, len(self.tensors),
                 sum(t.numel() for t in self.tensors.values()))
        self._hook(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._hook(trainer)

    def _hook(self, trainer) -> None:
        if self._active(trainer):
            self.round_now()  # the weights enter the epoch on the grid
        hook_optimizer_steps(trainer, self._hooked, lambda: self._after_step(trainer))

    def _after_step(self, trainer) -> None:
        if self._active(trainer):
            self.round_now()

    def state_dict(self) -> dict:
        gen = self._gen.get_state() if self._gen is not None else self._gen_state
        return {"generator": gen}

    def load_state_dict(self, state: dict) -> None:
        self._gen_state = state.get("generator")
        self._gen = None
