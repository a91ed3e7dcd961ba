"""Quant-Noise training as a Lightning callback (Fan et al. 2020).

In ``setup`` the selected Linear / Conv2d / Embedding layers (module-name regexes, each must
match a layer) become fake-quant layers (:mod:`qtrain.nn.fake_quant`, sharing the float
parameters) whose weight slot holds a :class:`qtrain.nn.quant_noise.QuantNoiseQuantizer`
with the per-type rate ``p`` and ``block_size`` (Linear/Embedding default 8, 1x1 conv 4;
kxk conv kernels are whole blocks). Each layer gets its own mask seed; layers that share one
weight Parameter (tied LM embedding / output projection) share one quantizer when their
per-type ``p`` and ``block_size`` agree (one mask per step, one codebook).

Evaluation: after each validation (and test) epoch the callback evaluates the model twice
on the same dataloaders -- float (noise off, ``eval_p = 0``) and fully quantized
(``eval_p = 1``) -- and logs ``<prefix>_<metric>_float`` and ``<prefix>_<metric>_quant``.
The trainer's own test pass runs at ``test_eval_p`` (default 1: the fully quantized
model), so the run summary's quantized metric is the compressed model and its
float-weights metric (quantizers disabled) the float one; validation runs at p = 0.
Metrics come from ``metric_fn(pl_module, batch) -> {name: tensor}``; the default uses
``pl_module.eval_metrics(batch)`` if the module defines it, else (x, y) classification
(``loss`` = cross-entropy, ``acc``). ``max_eval_batches`` bounds the extra passes.

``fp32_metric`` (read by the run summary): the module's own validation metric
(``val_<pl_module.metric>``, noise off = the float weights) of the last validation while
every noised layer is still in the model; once a later method (iPQ) replaces a layer, it
keeps the value from before the replacement, i.e. the float Quant-Noise-trained model.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.convert import as_patterns, convert
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant.quant_noise import noise_block_size

TYPE_KEYS = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


def default_metric_fn(pl_module, batch) -> dict:
    if hasattr(pl_module, "eval_metrics"):
        return pl_module.eval_metrics(batch)
    x, y = batch[0], batch[1]
    logits = pl_module(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


class QuantNoiseCallback(pl.Callback):
    """Args:
        p: noise rate, a float or per type {Linear, Conv2d, Embedding}.
        block_size: int or per type {Linear, Conv2d (1x1), Embedding}.
        mode: 'int8', 'int4' or 'pq'; bits: PQ log2(K) (mode 'pq').
        granularity: scale per 'tensor' or 'channel'.
        include / exclude: module-name regexes; types: among Linear, Conv2d, Embedding.
        compare_eval: log float and fully-quantized metrics after val/test epochs.
        metric_fn, max_eval_batches: see module docstring. seed: base mask seed.
        clamp_centroids: mode 'pq' only; a layer with fewer blocks than 2^bits gets
            2^bits' = the largest power of two <= blocks / 4 instead of k-means' error
            (meant for smoke tests' tiny models: ``${model.tiny}``).
    """

    def __init__(self, p=0.1, block_size=8, mode: str = "int8", bits: int | None = None,
                 granularity: str = "tensor", include=(".*",), exclude=(),
                 types=("Linear", "Conv2d", "Embedding"), compare_eval: bool = True,
                 metric_fn=None, max_eval_batches: int | None = None, seed: int = 0,
                 pq_refresh: int = 1000, clamp_centroids: bool = False,
                 test_eval_p: float = 1.0) -> None:
        super().__init__()
        bad = [t for t in types if t not in TYPE_KEYS]
        if bad:
            raise ValueError(f"quant_noise.types: {bad} unknown; allowed: {sorted(TYPE_KEYS)}")
        self.p = self._per_type(p, "p", types)
        self.block_size = self._per_type(block_size, "block_size", types,
                                         {"Linear": 8, "Embedding": 8, "Conv2d": 4})
        self.mode, self.bits, self.granularity = mode, bits, granularity
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.types = list(types)
        self.compare_eval, self.max_eval_batches, self.seed = compare_eval, max_eval_batches, seed
        self.metric_fn = metric_fn or default_metric_fn
        self.pq_refresh, self.clamp_centroids = pq_refresh, bool(clamp_centroids)
        if not 0.0 <= float(test_eval_p) <= 1.0:
            raise ValueError(f"quant_noise.test_eval_p={test_eval_p} must be in [0, 1]")
        self.test_eval_p = float(test_eval_p)
        self.layers: dict[str, nn.Module] = {}
        self.fp32_metric: float | None = None
        QuantNoiseQuantizer(bits, 0.0, 8, mode, granularity)  # validate mode/bits early

    @staticmethod
    def _per_type(value, key, types, defaults=None):
        if isinstance(value, (int, float)):
            return {t: value for t in types}
        value = dict(value)
        extra = set(value) - set(TYPE_KEYS)
        if extra:
            raise ValueError(f"quant_noise.{key}: keys {sorted(extra)}; allowed: {sorted(TYPE_KEYS)}")
        return {t: value.get(t, (defaults or {}).get(t)) for t in types}

    def _type_key(self, m) -> str:
        return next(k for k, t in TYPE_KEYS.items() if isinstance(m, t))

    def setup(self, trainer, pl_module, stage=None) -> None:
        if self.layers:
            return
        counter = iter(range(10**6))
        shared: dict[int, tuple] = {}  # id(weight) -> (p, block size, quantizer): tied layers

        def build(name, m):
            if is_fake_quant(m):
                raise ValueError(f"quant_noise: layer {name} is already a fake-quant layer")
            key = self._type_key(m)
            tied = shared.get(id(m.weight))
            if tied is not None and tied[:2] == (self.p[key], self.block_size[key]):
                # a weight tied to an earlier layer (LM embedding / output projection): one
                # quantizer, so one noise mask per step, one codebook, counted and exported once
                return FAKE_QUANT_TYPES[type(m)].from_float(m, tied[2])
            bs = noise_block_size(m.weight, self.block_size[key], name)  # divides input dim
            bits = self.bits
            if self.mode == "pq" and self.clamp_centroids:
                n_blocks = m.weight.numel() // bs
                if 2 ** (bits or 8) > n_blocks:
                    bits = max(1, (n_blocks // 4).bit_length() - 1)
            q = QuantNoiseQuantizer(bits, self.p[key], self.block_size[key], self.mode,
                                    self.granularity, self.seed * 100003 + next(counter),
                                    pq_refresh=self.pq_refresh)
            shared.setdefault(id(m.weight), (self.p[key], self.block_size[key], q))
            return FAKE_QUANT_TYPES[type(m)].from_float(m, q)

        types = tuple(TYPE_KEYS[t] for t in self.types)
        self.layers = convert(pl_module, build, self.include, self.exclude, types, "quant_noise")

    def quantizers(self):
        return [m.weight_quantizer for m in self.layers.values()]

    def set_eval_p(self, eval_p: float) -> None:
        for q in self.quantizers():
            q.eval_p = float(eval_p)

    # -- float vs quantized evaluation ----------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, trainer, pl_module, loaders, eval_p: float) -> dict:
        self.set_eval_p(eval_p)
        sums, n = {}, 0
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        was = pl_module.training
        pl_module.eval()
        try:
            for loader in loaders:
                for i, batch in enumerate(loader):
                    if self.max_eval_batches is not None and i >= self.max_eval_batches:
                        break
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    for k, v in self.metric_fn(pl_module, batch).items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n += 1
        finally:
            self.set_eval_p(0.0)
            pl_module.train(was)
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _compare(self, trainer, pl_module, loaders, prefix: str) -> None:
        if not self.compare_eval or loaders is None or trainer.sanity_checking:
            return
        for tag, eval_p in (("float", 0.0), ("quant", 1.0)):
            for k, v in self._evaluate(trainer, pl_module, loaders, eval_p).items():
                pl_module.log(f"{prefix}_{k}_{tag}", v, sync_dist=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._compare(trainer, pl_module, trainer.val_dataloaders, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.layers:
            return
        live = {id(m) for m in pl_module.modules()}
        if not all(id(m) in live for m in self.layers.values()):
            return  # a layer was replaced (e.g. by iPQ): keep the float value from before
        value = trainer.callback_metrics.get(f"val_{getattr(pl_module, 'metric', 'acc')}")
        if value is not None:
            self.fp32_metric = float(value)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.set_eval_p(self.test_eval_p)

    def on_test_end(self, trainer, pl_module) -> None:
        self.set_eval_p(0.0)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._compare(trainer, pl_module, trainer.test_dataloaders, "test")

    def state_dict(self) -> dict:  # masks/steps/codebooks live in the model's buffers
        return {"layers": sorted(self.layers), "mode": self.mode, "p": self.p,
                "fp32_metric": self.fp32_metric}

    def load_state_dict(self, state: dict) -> None:
        if self.layers and sorted(self.layers) != state["layers"]:
            raise ValueError(f"quant_noise: checkpoint layers {state['layers']} differ from the "
                             f"configured selection {sorted(self.layers)}")
        self.fp32_metric = state.get("fp32_metric", self.fp32_metric)
