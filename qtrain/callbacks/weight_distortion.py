"""Training and testing with weight projections / distortions (Merolla et al. 2016, "Deep
neural networks are robust to weight binarization and other non-linear distortions", arXiv
1606.01981) as a Lightning callback.

Layer selection, the first/last policy and the float -> distorted schedule are the QAT
callback's (:class:`qtrain.callbacks.qat.QATCallback`: include/exclude regexes through
``select_modules``, each must match a layer); every selected layer's weight slot holds a
:class:`qtrain.nn.distortion_quantizer.WeightDistortionQuantizer` with the configured
training projection (``train``: a new draw every step, BinaryConnect-style: forward with
P(w), gradient applied to the float w) and test projection (``test``: validation and test;
one draw per weight version). ``train.projection=none`` trains in float and only tests
distorted; ``train.projection=stochastic_multiply`` is the paper's stochastic projection
rule as a public reimplementation reads it (:mod:`qtrain.quant.distortions`).

What the callback adds:

* ``clip_weights``: after every optimizer step (``on_train_batch_end``) the float weights of
  the distorted layers are clipped to [-c, c] (BinaryConnect's clip, which the paper keeps;
  with ``train.projection=none`` it is the paper's "simply clipping the weights" training).
  ``clip_scale='absolute'``: c = clip_weights (BinaryConnect: 1); ``'init_std'``: c =
  clip_weights x the layer's weight std when distortion training starts (kept in the
  callback's state: a resumed run clips at the same bounds) -- our option, for layers whose
  weights never reach 1 (a small network with default init, where an absolute clip at 1 would
  never act). Null: no clipping.
* ``effective_bits``: at each test epoch with the projections on, the effective bits per
  weight of the test projection (:func:`qtrain.quant.distortions.effective_bits`, the same
  draw the test used), averaged over the distorted layers weighted by their number of weights
  (``layer_bits`` per layer); logged as ``test_effective_bits`` and written to the run summary
  (``effective_bits``, column ``quant/effective_bits`` of a sweep's summary.csv), so a
  multirun over projections reports accuracy against effective bits per weight.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import DictConfig, OmegaConf

from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.nn.distortion_quantizer import WeightDistortionQuantizer

CLIP_SCALES = ("absolute", "init_std")


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class WeightDistortionCallback(QATCallback):
    """Args:
        train / test: projection specs (:mod:`qtrain.nn.distortion_quantizer`); test=None:
            the training projection.
        scale: alpha_k of the normalizing projections (max_abs | mean_abs | none).
        seed: base seed of the random draws (one derived per layer).
        clip_weights / clip_scale: float-weight clipping after every step (module docstring).
        bits, include, exclude, types, first_last, overrides, start_epoch: as
            :class:`QATCallback` (``bits`` is not used by the projections); ``first_last``
            defaults to 'quantize' (every layer projected, as BinaryConnect).
    """

    def __init__(self, train=None, test=None, scale: str = "max_abs", seed: int | None = 0,
                 clip_weights: float | None = 1.0, clip_scale: str = "absolute",
                 bits: int = 32, first_last: str = "quantize", **kw) -> None:
        train, test = _plain(train), _plain(test)
        # validated here first, so a bad spec is one error naming quant.train.* / quant.test.*
        WeightDistortionQuantizer(bits, train=train, test=test, scale=scale, seed=seed)
        if clip_weights is not None and not (isinstance(clip_weights, (int, float))
                                             and not isinstance(clip_weights, bool)
                                             and clip_weights > 0):
            raise ConfigError(f"quant.clip_weights={clip_weights!r}; allowed: a positive "
                              "number or null")
        if clip_scale not in CLIP_SCALES:
            raise ConfigError(f"quant.clip_scale={clip_scale!r}; allowed: {list(CLIP_SCALES)}")
        factory = functools.partial(WeightDistortionQuantizer, train=train, test=test,
                                    scale=scale, seed=seed)
        super().__init__(bits=bits, weight=factory, act=None, first_last=first_last, **kw)
        self.clip_weights, self.clip_scale = clip_weights, clip_scale
        self.clip_bounds: dict[str, float] = {}
        self.effective_bits: float | None = None
        self.layer_bits: dict[str, float] = {}

    def quantizers(self) -> dict[str, WeightDistortionQuantizer]:
        return {n: m.weight_quantizer for n, m in self.layers.items()
                if isinstance(getattr(m, "weight_quantizer", None), WeightDistortionQuantizer)}

    def _on(self, trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch

    # -- clipping -------------------------------------------------------------------
    @torch.no_grad()
    def _set_clip_bounds(self) -> None:
        if self.clip_weights is None or self.clip_bounds:
            return
        for name, m in self.layers.items():
            c = float(self.clip_weights)
            if self.clip_scale == "init_std":
                c *= float(m.weight.detach().std())
            self.clip_bounds[name] = c

    @torch.no_grad()
    def clip(self) -> None:
        """Clip the distorted layers' float weights to their bounds."""
        for name, c in self.clip_bounds.items():
            self.layers[name].weight.clamp_(-c, c)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._on(trainer):
            self._set_clip_bounds()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._on(trainer):
            self._set_clip_bounds()  # at the float -> distorted switch: bounds of the float weights
            self.clip()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._on(trainer):
            self.clip()

    # -- effective bits -------------------------------------------------------------
    @torch.no_grad()
    def compute_effective_bits(self) -> float | None:
        """Weighted mean effective bits per weight of the test projection over the distorted
        layers (``layer_bits``: each layer's)."""
        qs = self.quantizers()
        if not qs:
            return None
        self.layer_bits = {n: q.effective_bits(self.layers[n].weight) for n, q in qs.items()}
        sizes = {n: self.layers[n].weight.numel() for n in qs}
        self.effective_bits = sum(self.layer_bits[n] * sizes[n] for n in qs) / sum(sizes.values())
        return self.effective_bits

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        qs = self.quantizers()
        if not qs or not all(q.enabled for q in qs.values()):
            return  # the float-weights evaluation: no distortion, nothing to report
        pl_module.log("test_effective_bits", self.compute_effective_bits())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clip_bounds": dict(self.clip_bounds),
                "effective_bits": self.effective_bits, "layer_bits": dict(self.layer_bits)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clip_bounds = dict(state.get("clip_bounds") or {})
        self.effective_bits = state.get("effective_bits")
        self.layer_bits = dict(state.get("layer_bits") or {})
