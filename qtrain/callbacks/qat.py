"""Quantization-aware training as a Lightning callback (Jacob et al. 2018 style).

In ``setup`` the callback swaps the selected ``nn.Linear`` / ``nn.Conv2d`` (/ ``nn.Embedding``)
modules for fake-quant layers (:mod:`qtrain.nn.fake_quant`) that share the original float
parameters -- no ``forward`` is monkeypatched and the master weights are never overwritten.
The weight and activation quantizers are built from config factories (``_partial_``
quantizer classes, bits filled in per layer), so the same callback drives uniform QAT,
XNOR/TWN/TTQ, PACT, LSQ, DSQ, DoReFa, FP8, ... .

Schedule: quantizers are disabled (float training) for ``start_epoch`` epochs, then enabled;
the last float validation metric is kept as ``fp32_metric`` and the float weights at the
switch as ``fp32_state`` (so the run can also test the FP32 model; written once to the run
dir, the checkpoints reference it: :mod:`qtrain.callbacks.fp32_snapshot`). Because the
module structure is fixed from ``setup`` on, checkpoints resume with the same quantizer
state (observer ranges, learned scales are module buffers/parameters).

Integer-only QAT (Jacob et al. 2018; ``conf/quant/intqat.yaml``):

* ``fold_bn``: every selected conv / linear whose only consumer is a BatchNorm becomes a
  :class:`qtrain.nn.bn_fold.FoldedConvBN` / ``FoldedLinearBN`` (sec. 3.2, Fig. C.8; the BN
  is replaced by Identity, its parameters live on in the folded layer). ``bn_freeze_step``:
  from this global step on, the folded layers use and freeze the moving statistics (TF's
  ``freeze_batch_norm_delay``; None: never).
* ``quantize_residual``: ResNet basic blocks get the paper's quantization points (block
  input quantized once for branch and shortcut, branch output quantized before the add;
  :mod:`qtrain.nn.quant_residual`).
* ``integer_eval``: at the end of fit the trained model is converted to integer-only
  inference (:mod:`qtrain.nn.integer_inference`, on CPU) and evaluated on the test set:
  ``int_metric`` (logged as ``test/<metric>_int``) next to the fake-quant model's
  ``int_ref_metric`` on the same batches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks.fp32_snapshot import KEY as SNAPSHOT_KEY
from qtrain.callbacks.fp32_snapshot import FP32Snapshot, state_property
from qtrain.errors import ConfigError
from qtrain.nn import convert as C
from qtrain.nn.bn_fold import find_conv_bn_pairs, fold_bn_layer
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant
from qtrain.nn.quant_residual import QuantBasicBlock, is_basic_block
from qtrain.quant.rounding import derive_seed

log = logging.getLogger(__name__)
LAYER_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
OVERRIDE_KEYS = ("bits", "act_bits", "skip")


class QATCallback(pl.Callback):
    """Args:
        bits: weight bits (per-layer ``overrides`` may change it).
        weight: factory ``f(bits) -> Quantizer`` for weights (None: float weights).
        act: factory ``f(bits) -> Quantizer`` for layer inputs (None: float activations).
        act_bits: activation bits (None: same as ``bits``).
        include / exclude: module-name regexes (each must match a layer).
        types: layer types to quantize, among Linear, Conv2d, Embedding.
        first_last: 'quantize', 'keep' (float) or '8bit'.
        overrides: {regex: {bits, act_bits, skip}} per-layer settings (later wins).
        start_epoch: epochs of float training before quantization is enabled.
        fold_bn / bn_freeze_step / quantize_residual / integer_eval: integer-only QAT
            (module docstring).
    """

    fp32_state = state_property()  # module state at the float -> quantized switch

    def __init__(
        self, bits: int = 8, weight: Callable | None = None, act: Callable | None = None,
        act_bits: int | None = None, include: list[str] = (".*",), exclude: list[str] = (),
        types: list[str] = ("Linear", "Conv2d"), first_last: str = "keep",
        overrides: Mapping[str, Mapping] | None = None, start_epoch: int = 0,
        fold_bn: bool = False, bn_freeze_step: int | None = None,
        quantize_residual: bool = False, integer_eval: bool = False,
    ) -> None:
        super().__init__()
        if first_last not in C.FIRST_LAST_POLICIES:
            raise ConfigError(f"quant.first_last={first_last!r}; allowed: {C.FIRST_LAST_POLICIES}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"quant.types: {bad} unknown; allowed: {sorted(LAYER_TYPES)}")
        for pat, vals in (overrides or {}).items():
            extra = set(vals) - set(OVERRIDE_KEYS)
            if extra:
                raise ConfigError(f"quant.overrides[{pat!r}]: keys {sorted(extra)}; allowed: {OVERRIDE_KEYS}")
        if weight is None and act is None:
            raise ConfigError("quant: both quant.weight and quant.act are null: nothing to quantize")
        self.bits, self.act_bits = bits, act_bits if act_bits is not None else bits
        self.weight_factory, self.act_factory = weight, act
        self.include, self.exclude = C.as_patterns(include), C.as_patterns(exclude)
        self.types = tuple(LAYER_TYPES[t] for t in types)
        self.first_last, self.overrides = first_last, dict(overrides or {})
        self.start_epoch = start_epoch
        if bn_freeze_step is not None and (not fold_bn or int(bn_freeze_step) < 0):
            raise ConfigError(f"quant.bn_freeze_step={bn_freeze_step}: needs quant.fold_bn=true "
                              "and a step >= 0 (or null: never freeze)")
        if quantize_residual and act is None:
            raise ConfigError("quant.quantize_residual=true needs an activation quantizer (quant.act)")
        self.fold_bn, self.bn_freeze_step = bool(fold_bn), bn_freeze_step
        self.quantize_residual, self.integer_eval = bool(quantize_residual), bool(integer_eval)
        self.layers: dict[str, nn.Module] = {}
        self.blocks: dict[str, nn.Module] = {}
        self.int_metric: float | None = None
        self.int_ref_metric: float | None = None
        self.fp32_metric: float | None = None
        self.fp32_snapshot = FP32Snapshot("qat")
        # validate the factories and bit widths now, before any training starts
        self._make(self.weight_factory, self.bits, "quant.bits")
        self._make(self.act_factory, self.act_bits, "quant.act_bits")

    @staticmethod
    def _make(factory, bits, key):
        if factory is None:
            return None
        try:
            return factory(bits=bits)
        except ValueError as e:
            raise ConfigError(f"{key}={bits}: {e}") from None

    # -- conversion ----------------------------------------------------------------
    def convert(self, model: nn.Module) -> dict[str, nn.Module]:
        first, last = C.first_and_last(model, (nn.Linear, nn.Conv2d))
        chosen = C.select_modules(model, self.include, self.exclude, self.types)
        C.check_overrides_used(chosen, self.overrides, "quant.overrides")
        pairs = find_conv_bn_pairs(model) if self.fold_bn else {}
        if self.fold_bn and not pairs:
            raise ConfigError("quant.fold_bn=true: the model has no conv/linear -> BatchNorm pair")
        folded_bns = []

        def build(name: str, m: nn.Module):
            o = C.match_override(name, self.overrides)
            if o.get("skip"):
                return None
            bits, act_bits = o.get("bits", self.bits), o.get("act_bits", self.act_bits)
            if name in (first, last):
                if self.first_last == "keep":
                    return None
                if self.first_last == "8bit":
                    bits = act_bits = 8
            wq = self._make(self.weight_factory, bits, f"quant bits for layer {name}")
            aq = None if isinstance(m, nn.Embedding) else self._make(
                self.act_factory, act_bits, f"quant act_bits for layer {name}")
            _own_random_stream(wq, name, "weight")
            _own_random_stream(aq, name, "act")
            if name in pairs:
                folded_bns.append(pairs[name])
                folded = fold_bn_layer(m, model.get_submodule(pairs[name]), wq, aq)
                folded.bn_name = pairs[name]  # where the BN was (the packed file records it)
                return folded
            return FAKE_QUANT_TYPES[type(m)].from_float(m, wq, aq)

        self.layers = C.convert(model, build, self.include, self.exclude, self.types)
        if not self.layers:
            raise C.LayerSelectionError("quant: after the first/last policy and overrides no layer is left")
        for bn_name in folded_bns:  # its parameters and statistics now live in the folded layer
            C.set_submodule(model, bn_name, nn.Identity())
        if self.quantize_residual:
            self._convert_blocks(model)
        log.info("quantized %d layers: %s", len(self.layers), ", ".join(self.layers))
        return self.layers

    def _convert_blocks(self, model: nn.Module) -> None:
        """Give ResNet basic blocks the paper's quantization points (quant_residual)."""
        for name, m in list(model.named_modules()):
            if not is_basic_block(m):
                continue
            aq = getattr(m.conv1, "act_quantizer", None)
            if not is_fake_quant(m.conv1) or aq is None:
                raise ConfigError(f"quant.quantize_residual=true: block {name}.conv1 is not "
                                  "quantized (overrides / first_last keep it float)")
            m.conv1.act_quantizer = None  # moved to the block: shared with the shortcut
            branch = self._make(self.act_factory, getattr(aq, "bits", self.act_bits),
                                f"quant act_bits for block {name}")
            new = QuantBasicBlock(m, aq, branch)
            C.set_submodule(model, name, new)
            self.blocks[name] = new
        if not self.blocks:  # a plain chain (no bypass add): nothing to change
            return
        # the last block feeds global pooling -> classifier: quantize right after its bypass
        # add with the classifier's input quantizer (quant_residual docstring)
        _, last = C.first_and_last(model, (nn.Linear, nn.Conv2d))
        fc, block = model.get_submodule(last), list(self.blocks.values())[-1]
        if is_fake_quant(fc) and getattr(fc, "act_quantizer", None) is not None:
            block.output_quantizer, fc.act_quantizer = fc.act_quantizer, None

    def validate(self, pl_module) -> None:
        """Before training (:mod:`qtrain.validation`): select the layers as :meth:`convert`
        will and run a fresh weight quantizer of each on that layer's weight (a copy; the
        model is not changed), so a setting that does not fit a layer (e.g. a Q-BERT
        ``num_heads`` that does not divide its rows) fails now, naming the layer and the key,
        rather than when quantization starts after ``start_epoch`` float epochs."""
        model = pl_module.model
        first, last = C.first_and_last(model, (nn.Linear, nn.Conv2d))
        chosen = C.select_modules(model, self.include, self.exclude, self.types)
        C.check_overrides_used(chosen, self.overrides, "quant.overrides")
        left = 0
        for name, m in chosen.items():
            o = C.match_override(name, self.overrides)
            if o.get("skip") or (name in (first, last) and self.first_last == "keep"):
                continue
            left += 1
            bits = 8 if name in (first, last) and self.first_last == "8bit" else o.get("bits", self.bits)
            key = f"quant.overrides bits={bits}" if "bits" in o else f"quant.bits={bits}"
            wq = self._make(self.weight_factory, bits, f"quant bits for layer {name}")
            if wq is None:
                continue
            try:
                with torch.no_grad():
                    wq(m.weight.detach().clone())
            except ValueError as e:
                raise ConfigError(f"quant.weight ({type(wq).__name__}, {key}) does not fit layer "
                                  f"{name} (weight {tuple(m.weight.shape)}): {e}") from None
        if not left:
            raise C.LayerSelectionError("quant: after the first/last policy and overrides no layer is left")

    def set_enabled(self, flag: bool) -> None:
        for m in list(self.layers.values()) + list(self.blocks.values()):
            for q in m.quantizers():
                q.enabled = flag

    def set_bn_frozen(self, step: int) -> None:
        """Folded layers use (and stop updating) the moving statistics from ``bn_freeze_step`` on."""
        if self.bn_freeze_step is None:
            return
        frozen = step >= int(self.bn_freeze_step)
        for m in self.layers.values():
            if hasattr(m, "freeze_bn"):
                m.freeze_bn(frozen)

    # -- Lightning hooks -------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.fp32_snapshot.bind(trainer)
        if self.layers:  # a later fit/validate/test of the same run: keep the current state
            return
        model = pl_module.model
        if not any(is_fake_quant(m) for m in model.modules()):
            self.convert(model)
        else:
            self.layers = {n: m for n, m in model.named_modules() if is_fake_quant(m)}
            self.blocks = {n: m for n, m in model.named_modules() if isinstance(m, QuantBasicBlock)}
        self.set_enabled(stage != "fit" or self.start_epoch == 0)

    def on_train_start(self, trainer, pl_module) -> None:
        # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
        self.set_enabled(trainer.current_epoch >= self.start_epoch)
        self.set_bn_frozen(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.set_bn_frozen(trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        on = trainer.current_epoch >= self.start_epoch
        if on and self.start_epoch > 0 and trainer.current_epoch == self.start_epoch:
            key = f"val_{pl_module.metric}"
            if key in trainer.callback_metrics:
                self.fp32_metric = float(trainer.callback_metrics[key])
            self.fp32_snapshot.take(trainer, pl_module)
        self.set_enabled(on)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.set_enabled(trainer.current_epoch >= self.start_epoch)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.set_enabled(True)  # what follows fit (test, export) sees the quantized model
        if self.integer_eval and trainer.is_global_zero:
            self.run_integer_eval(trainer, pl_module)

    def run_integer_eval(self, trainer, pl_module) -> None:
        """Test accuracy of the integer-only model and of the fake-quant model on the same
        test batches (CPU; ``trainer.limit_test_batches`` honoured)."""
        from qtrain.nn.integer_inference import to_integer_model

        if pl_module.metric != "acc":
            raise ConfigError(f"quant.integer_eval=true: classification accuracy only; the task's "
                              f"metric is {pl_module.metric!r}")
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("quant.integer_eval=true needs a datamodule with a test set")
        dm.setup("test")
        model = copy.deepcopy(pl_module.model).cpu().eval()
        int_model = to_integer_model(model)
        limit = trainer.limit_test_batches
        hits = hits_ref = total = 0
        for i, batch in enumerate(dm.test_dataloader()):
            if isinstance(limit, int) and i >= limit:
                break
            batch = dm.on_after_batch_transfer(batch, 0)  # normalisation of uint8 loaders
            x, y = pl_module.split_batch(batch)
            with torch.no_grad():
                hits += int((int_model(x.cpu()).argmax(-1) == y.cpu()).sum())
                hits_ref += int((model(x.cpu()).argmax(-1) == y.cpu()).sum())
            total += len(y)
        self.int_metric = hits / max(total, 1)
        self.int_ref_metric = hits_ref / max(total, 1)
        log.info("integer-only model: test %s %.4f (fake-quant on the same %d images %.4f)",
                 pl_module.metric, self.int_metric, total, self.int_ref_metric)

    def state_dict(self) -> dict:
        return {"fp32_metric": self.fp32_metric, "layers": sorted(self.layers),
                SNAPSHOT_KEY: self.fp32_snapshot.ref(), "int_metric": self.int_metric,
                "int_ref_metric": self.int_ref_metric}

    def load_state_dict(self, state: dict) -> None:
        self.fp32_metric = state.get("fp32_metric")
        self.fp32_snapshot.restore(state)
        self.int_metric = state.get("int_metric")
        self.int_ref_metric = state.get("int_ref_metric")


def _own_random_stream(q, layer: str, role: str) -> None:
    """A seeded quantizer (``quant.weight.seed`` / ``quant.act.seed``: stochastic rounding,
    stochastic gradient quantization) gets a seed of its own per layer and role, derived from
    the configured one (:func:`qtrain.quant.rounding.derive_seed`); its generator is created
    from it on first use."""
    if q is not None and getattr(q, "seed", None) is not None:
        q.seed = derive_seed(q.seed, layer, role)
