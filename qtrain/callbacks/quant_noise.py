"""Quant-Noise training as a Lightning callback (Fan et al. 2020).

In ``setup`` the selected Linear / Conv2d / Embedding layers (module-name regexes, each must
match a layer) become fake-quant layers (:mod:`qtrain.nn.fake_quant`, sharing the float
parameters) whose weight slot holds a :class:`qtrain.nn.quant_noise.QuantNoiseQuantizer`
with the per-type rate ``p`` and ``block_size`` (PQ / drop blocks: Linear/Embedding default
8, 1x1 conv 4; kxk conv kernels are whole blocks; int modes noise every weight
independently). Each layer gets its own mask seed; layers that share one weight Parameter
(tied LM embedding / output projection) share one quantizer when their per-type ``p`` and
``block_size`` agree (one mask per step, one codebook).

Noise for PQ: ``mode='drop'`` is the configured default (``conf/quant/quant_noise.yaml``)
because it is the Quant-Noise the authors train iPQ models with: fairseq's
``fairseq/modules/quant_noise.py`` zeroes the selected blocks and rescales the rest by
1/(1-p) ("the simplest form of noise ... as stated in the paper": the paper's cheap
training-time proxy for the PQ distortion -- ~, the paper's text not re-read here), its
``examples/quant_noise/README.md`` says it "worked as well as assigning those blocks to
their current centroid", and the README's commands for the paper's RoBERTa and WikiText-103
iPQ results train with it (``--quant-noise-pq``). ``mode='pq'`` (option) is the exact PQ
noise phi_PQ: a noised block takes the nearest codeword of its current weight. Both
are evaluated and exported as PQ. (The constructor's own default stays ``'int8'``.)

Int modes (fairseq's scalar ``quantize_model_``): every noised layer's output is also
quantized (:class:`qtrain.nn.quant_noise.OutputQuantNoise`, same bits, per-tensor min-max;
training: noise rate ``act_p``, fairseq's 0 = clamp to the range only; fully quantized in
the quantized evaluation). ``quantize_activations=False`` keeps activations float (option).

Steps: ``on_train_batch_start`` advances every quantizer once per training batch (a new
random mask; PQ codebooks refitted every ``pq_refresh`` steps), whatever the optimizer
(fused / foreach / plain updates alike).

Evaluation: after each validation (and test) epoch the callback evaluates the model twice
on the same dataloaders -- float (noise off, ``eval_p = 0``) and fully quantized
(``eval_p = 1``: weights and, int modes, outputs; PQ: the nearest codeword of the
current weight) -- and logs ``<prefix>_<metric>_float`` and ``<prefix>_<metric>_quant``.
The trainer's own test pass runs at ``test_eval_p`` (default 1: the fully quantized
model), so the run summary's quantized metric is the compressed model and its
float-weights metric (quantizers disabled) the float one; validation runs at p = 0.
Each pass aggregates over all its batches as the trainer's own validation does: the
accumulator ``metric_fn(pl_module)`` (``update(batch)``, ``compute() -> {name: value}``;
default: ``pl_module.eval_accumulator()`` of a task module, else (x, y) classification:
``loss`` = mean cross-entropy over all samples, ``acc``) -- so ``val_ppl_float`` /
``val_ppl_quant`` are exp of the token-weighted mean NLL over all evaluated tokens, like
``val_ppl``, not means of per-batch perplexities (those read 740.2 for 724.7 on PTB), and
MCC / F1 come from one confusion matrix. Under DDP the accumulator's ``compute()`` reduces
over all ranks. ``max_eval_batches`` bounds the extra passes (per dataloader).

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
from torchmetrics import MeanMetric

from qtrain.errors import ConfigError
from qtrain.nn.convert import as_patterns, convert
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant
from qtrain.nn.quant_noise import OutputQuantNoise, QuantNoiseQuantizer, attach_output_quantizer
from qtrain.quant.quant_noise import noise_block_size

TYPE_KEYS = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


class ClassificationAccumulator:
    """(x, y) classification over many batches for a module without ``eval_accumulator``:
    ``loss`` = cross-entropy summed over all samples / their number, ``acc`` = correct /
    samples (both reduced over DDP ranks by torchmetrics)."""

    def __init__(self, pl_module) -> None:
        self.module = pl_module
        self.loss, self.acc = MeanMetric().to(pl_module.device), MeanMetric().to(pl_module.device)

    @torch.no_grad()
    def update(self, batch) -> None:
        x, y = batch[0], batch[1]
        logits = self.module(x)
        self.loss.update(F.cross_entropy(logits, y, reduction="none"))
        self.acc.update((logits.argmax(-1) == y).float())

    def compute(self) -> dict:
        return {"loss": self.loss.compute(), "acc": self.acc.compute()}


def default_metric_fn(pl_module):
    """The module's own aggregation (``TaskModule.eval_accumulator``: perplexity = exp of the
    token-weighted mean NLL, MCC / F1 over all batches), else (x, y) classification."""
    if hasattr(pl_module, "eval_accumulator"):
        return pl_module.eval_accumulator()
    return ClassificationAccumulator(pl_module)


class QuantNoiseCallback(pl.Callback):
    """Args:
        p: noise rate, a float or per type {Linear, Conv2d, Embedding}.
        block_size: PQ / drop block, int or per type {Linear, Conv2d (1x1), Embedding}.
        mode: 'int8', 'int4', 'pq' or 'drop'; bits: PQ log2(K) (modes 'pq', 'drop').
        granularity: int modes: 'tensor' (min-max with zero-point, the paper's) or
            'channel' (symmetric per output channel).
        quantize_activations: int modes: quantize every noised layer's output (fairseq's
            scalar path; default True); act_p: its training noise rate (fairseq: 0);
            act_update_step: steps between its range refits (fairseq: 1000).
        include / exclude: module-name regexes; types: among Linear, Conv2d, Embedding.
        compare_eval: log float and fully-quantized metrics after val/test epochs.
        metric_fn: ``metric_fn(pl_module)`` -> accumulator (``update(batch)``, ``compute()``);
            see the module docstring. max_eval_batches: likewise. seed: base mask seed.
        clamp_centroids: mode 'pq' only; a layer with fewer blocks than 2^bits gets
            2^bits' = the largest power of two <= blocks / 4 instead of k-means' error
            (meant for smoke tests' tiny models: ``${model.tiny}``).
    """

    def __init__(self, p=0.1, block_size=8, mode: str = "int8", bits: int | None = None,
                 granularity: str = "tensor", include=(".*",), exclude=(),
                 types=("Linear", "Conv2d", "Embedding"), compare_eval: bool = True,
                 metric_fn=None, max_eval_batches: int | None = None, seed: int = 0,
                 pq_refresh: int = 1000, clamp_centroids: bool = False,
                 test_eval_p: float = 1.0, quantize_activations: bool = True,
                 act_p: float = 0.0, act_update_step: int = 1000) -> None:
        super().__init__()
        bad = [t for t in types if t not in TYPE_KEYS]
        if bad:
            raise ConfigError(f"quant_noise.types: {bad} unknown; allowed: {sorted(TYPE_KEYS)}")
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
            raise ConfigError(f"quant_noise.test_eval_p={test_eval_p} must be in [0, 1]")
        self.test_eval_p = float(test_eval_p)
        self.layers: dict[str, nn.Module] = {}
        self.fp32_metric: float | None = None
        probe = QuantNoiseQuantizer(bits, 0.0, 8, mode, granularity)  # validate mode/bits early
        self.is_pq = probe.is_pq
        self.quantize_activations = bool(quantize_activations) and not probe.is_pq
        self.act_p, self.act_update_step = act_p, act_update_step
        if isinstance(act_p, bool) or not isinstance(act_p, (int, float)) or not 0 <= act_p <= 1:
            raise ConfigError(f"quant_noise.act_p={act_p!r} must be a number in [0, 1]")
        if isinstance(act_update_step, bool) or not isinstance(act_update_step, int) \
                or act_update_step < 1:
            raise ConfigError(f"quant_noise.act_update_step={act_update_step!r} must be a "
                              "positive int")

    @staticmethod
    def _per_type(value, key, types, defaults=None):
        if isinstance(value, (int, float)):
            return {t: value for t in types}
        value = dict(value)
        extra = set(value) - set(TYPE_KEYS)
        if extra:
            raise ConfigError(f"quant_noise.{key}: keys {sorted(extra)}; "
                              f"allowed: {sorted(TYPE_KEYS)}")
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
                raise ConfigError(f"quant_noise: layer {name} is already a fake-quant layer")
            key = self._type_key(m)
            tied = shared.get(id(m.weight))
            if tied is not None and tied[:2] == (self.p[key], self.block_size[key]):
                # a weight tied to an earlier layer (LM embedding / output projection): one
                # quantizer, so one noise mask per step, one codebook, counted and exported once
                return FAKE_QUANT_TYPES[type(m)].from_float(m, tied[2])
            bits = self.bits
            if self.is_pq:  # PQ / drop blocks must divide the input dimension
                bs = noise_block_size(m.weight, self.block_size[key], name)
                if self.clamp_centroids and 2 ** (bits or 8) > m.weight.numel() // bs:
                    bits = max(1, (m.weight.numel() // bs // 4).bit_length() - 1)
            q = QuantNoiseQuantizer(bits, self.p[key], self.block_size[key], self.mode,
                                    self.granularity, self.seed * 100003 + next(counter),
                                    pq_refresh=self.pq_refresh)
            shared.setdefault(id(m.weight), (self.p[key], self.block_size[key], q))
            return FAKE_QUANT_TYPES[type(m)].from_float(m, q)

        types = tuple(TYPE_KEYS[t] for t in self.types)
        self.layers = convert(pl_module, build, self.include, self.exclude, types, "quant_noise")
        if self.quantize_activations:
            for m in self.layers.values():
                attach_output_quantizer(m, OutputQuantNoise(
                    m.weight_quantizer.bits, self.act_p, 0.0, self.act_update_step))

    def quantizers(self):
        """The weight quantizer of every noised layer (a tied pair's shared one twice)."""
        return [m.weight_quantizer for m in self.layers.values()]

    def output_quantizers(self):
        return [m.output_quantizer for m in self.layers.values()
                if isinstance(getattr(m, "output_quantizer", None), OutputQuantNoise)]

    def _all_quantizers(self):
        unique = {id(q): q for q in self.quantizers() + self.output_quantizers()}
        return list(unique.values())

    def set_eval_p(self, eval_p: float) -> None:
        for q in self._all_quantizers():
            q.eval_p = float(eval_p)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """A new training step for every quantizer (each shared one once): new masks,
        PQ codebook / activation range refits when due."""
        for q in self._all_quantizers():
            q.new_step()

    # -- float vs quantized evaluation ----------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, trainer, pl_module, loaders, eval_p: float) -> dict:
        """The metrics of one pass over ``loaders`` at ``eval_p``, aggregated over all
        evaluated batches (and DDP ranks) by the accumulator of ``metric_fn``."""
        self.set_eval_p(eval_p)
        acc = self.metric_fn(pl_module)
        if not (callable(getattr(acc, "update", None)) and callable(getattr(acc, "compute", None))):
            raise ConfigError(f"quant_noise.metric_fn returned {type(acc).__name__}; it must "
                              "return an accumulator with update(batch) and compute() -> dict")
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        was, seen = pl_module.training, 0
        pl_module.eval()
        try:
            for loader in loaders:
                for i, batch in enumerate(loader):
                    if self.max_eval_batches is not None and i >= self.max_eval_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)  # + dm hooks
                    acc.update(batch)
                    seen += 1
        finally:
            self.set_eval_p(0.0)
            pl_module.train(was)
        return {k: float(v) for k, v in acc.compute().items()} if seen else {}

    def _compare(self, trainer, pl_module, loaders, prefix: str) -> None:
        if not self.compare_eval or loaders is None or trainer.sanity_checking:
            return
        for tag, eval_p in (("float", 0.0), ("quant", 1.0)):
            for k, v in self._evaluate(trainer, pl_module, loaders, eval_p).items():
                # already over all ranks (torchmetrics' compute): no second reduction
                pl_module.log(f"{prefix}_{k}_{tag}", v)

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
            raise ConfigError(f"quant_noise: checkpoint layers {state['layers']} differ from the "
                             f"configured selection {sorted(self.layers)}")
        self.fp32_metric = state.get("fp32_metric", self.fp32_metric)
