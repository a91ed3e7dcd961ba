"""Iterative product quantization as a Lightning callback (Stock et al. 2019, "And the Bit
Goes Down"; staged as in Fan et al. 2020, sec. 4.3).

Layers are quantized in stages (groups given by module-name regexes; each regex must match
at least one layer). At the start of stage t (``boundaries[t]`` in epochs or optimizer
steps; no divisibility requirement) every layer of the group gets a k-means codebook
(K centroids of ``block_size`` sub-vectors, :mod:`qtrain.quant.kmeans`), optionally with
the activation-aware objective ``||x (W - W_hat)||^2`` on inputs sampled from the current
batch, and is replaced by a PQ layer (:mod:`qtrain.nn.pq_layers`: trainable centroids,
frozen assignments, centroid gradient = mean over its blocks). The centroids and every
not-yet-quantized layer are then finetuned.

After each replacement the optimizer (and LR schedulers) are rebuilt from the module's
``configure_optimizers`` (``trainer.strategy.setup_optimizers``), so the optimizer holds
exactly the live trainable parameters; ``lr_schedule='continue'`` fast-forwards the new
schedulers to the current step/epoch, ``'restart'`` restarts them. Under DDP the codebooks
are fitted on rank 0 and broadcast, and the model is re-wrapped in DDP.

Tied weights (an LM's embedding and output projection sharing one Parameter): the layer
of the stage is fitted once and every other layer using the same weight Parameter becomes a
PQ layer sharing its ``centroids`` and ``assignments`` (:func:`qtrain.nn.pq_layers.pq_tied`),
so the tie survives iPQ, the shared centroids are trained by both uses and the size is
counted once. A tied layer named in a later stage is already quantized and is skipped.
Simplification: the shared codebook is fitted with the objective of the layer that is fitted
(for an activation-aware embedding: token-frequency row weights), not a joint objective of
both uses.

Runs that end before the last stage (``max_steps`` / ``max_epochs`` too short for the
schedule, early stopping): with ``on_incomplete='quantize'`` (default) every stage not yet
applied is applied at the end of fit (``on_train_end``), in stage order, with the same
k-means fit as a scheduled stage (activation-aware: on the last training batch), so the
model that is tested and exported is fully product-quantized, as INQ and Deep Compression
do at the end of fit; those late stages get no finetuning (a warning at train start says so
when the schedule cannot fit). ``on_incomplete='error'`` instead stops with a
:class:`~qtrain.errors.ConfigError` before the first training step when the last stage start
is not reached by the trainer's ``max_steps`` / ``max_epochs``.

Resume: the callback registers a ``load_state_dict`` pre-hook on the LightningModule that
rebuilds PQ layers for every ``<layer>.centroids`` found in the checkpoint before the
weights are loaded, so a run resumed mid-stage continues with the same modules, optimizer
state and weights. Defaults (REFERENCES.md): K = 256; block sizes fc 8, attention 4,
embeddings 8, conv 3x3 9 (kh*kw), 1x1 4; transformer order FFN -> embeddings -> attention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from qtrain import layer_report
from qtrain.callbacks.optimizer_hooks import rebuild_optimizers
from qtrain.errors import ConfigError
from qtrain.nn.convert import (
    LayerSelectionError,
    as_patterns,
    layer_name,
    network_prefix,
    rule_matcher,
    select_modules,
    set_submodule,
)
from qtrain.nn.pq_layers import (
    is_pq,
    pq_class_for,
    pq_from_state,
    pq_tied,
    rebuild_pq_layers,
    tied_partners,
    unfold_inputs,
)
from qtrain.quant import kmeans as KM

TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)
ATTENTION_RE = r".*(attn|attention|q_proj|k_proj|v_proj|out_proj|query|key|value).*"
PRESETS = {
    "fairseq_transformer": [[r".*fc1", r".*fc2"], [r".*embed_tokens"],
                            [r".*(q_proj|k_proj|v_proj|out_proj)"]],
    "hf_bert": [[r".*intermediate\.dense", r".*layer\.\d+\.output\.dense"],
                [r".*embeddings\.(word|position)_embeddings"],
                [r".*attention\.self\.(query|key|value)", r".*attention\.output\.dense"]],
}
DEFAULT_BLOCKS = {"fc": 8, "attention": 4, "embedding": 8, "conv1x1": 4}
UNITS = ("epoch", "step")
ON_INCOMPLETE = ("quantize", "error")


def default_block_size(name: str, m: nn.Module, blocks: dict) -> int:
    if isinstance(m, nn.Embedding):
        return blocks["embedding"]
    if isinstance(m, nn.Conv2d):
        kk = m.kernel_size[0] * m.kernel_size[1]
        return blocks.get("conv", kk) if kk > 1 else blocks["conv1x1"]
    return blocks["attention"] if re.fullmatch(ATTENTION_RE, name) else blocks["fc"]


def network_order_stages(model: nn.Module, exclude=()) -> list[list[str]]:
    """CNN preset: one stage per top-level child holding Linear/Conv2d/Embedding layers.
    Wrappers with a single such child (a LightningModule holding ``model``) are descended."""
    prefix, net_prefix = "", network_prefix(model)  # patterns name layers without net_prefix
    while True:
        holders = [(n, c) for n, c in model.named_children()
                   if any(isinstance(m, TYPES) for m in c.modules())]
        if len(holders) != 1 or isinstance(holders[0][1], TYPES):
            break
        prefix, model = f"{prefix}{holders[0][0]}.", holders[0][1]
    full = {child: [f"{prefix}{child}.{n}" if n else f"{prefix}{child}"
                    for n, m in mod.named_modules() if isinstance(m, TYPES)]
            for child, mod in model.named_children()}
    everything = [n for names in full.values() for n in names]
    # the same matching as select_modules (relative names; the old model\. form warns)
    skip = [m for p in exclude
            if (m := rule_matcher(re.compile(p), everything, net_prefix, "ipq.exclude"))]
    stages = []
    for names in full.values():
        names = [layer_name(n, net_prefix) for n in names if not any(m(n) for m in skip)]
        if names:
            stages.append([re.escape(n) for n in names])
    return stages


def _default_forward(pl_module, batch):
    """Run the model on a training batch to sample layer inputs (activation-aware iPQ).

    A task module's own ``split_batch`` gives the model input (a qtrain ``TaskModule``:
    ``(x, y)`` tuples, or an HF dict batch whose inputs stay a dict for
    ``HFSequenceClassifier``). Otherwise: a dict batch is passed as keyword arguments without
    its labels (``model(**batch)``, the HF convention), a tuple/list batch as its first
    element, anything else as is.
    """
    split = getattr(pl_module, "split_batch", None)
    if callable(split):
        inputs, _ = split(batch)
        return pl_module(inputs)
    if isinstance(batch, Mapping):
        return pl_module(**{k: v for k, v in batch.items() if k not in ("labels", "label")})
    if isinstance(batch, (list, tuple)):
        return pl_module(batch[0])
    return pl_module(batch)


class IterativePQCallback(pl.Callback):
    """Args:
        stages: preset name ('fairseq_transformer', 'hf_bert', 'cnn') or a list of stages,
            each a list of regexes or a dict {include: [...], block_size: int}.
        exclude: regexes of layers never quantized.
        n_centroids, n_iter: k-means K and iterations. clamp_centroids: a layer with fewer
            sub-vectors than K gets K = the largest power of two <= sub-vectors / 4 instead of
            the error (meant for smoke tests' tiny models: ``${model.tiny}``). block_sizes: overrides of
            DEFAULT_BLOCKS ({fc, attention, embedding, conv1x1, conv}).
        boundaries / start / stage_length / unit: stage starts (epochs or steps); without
            ``boundaries`` stage i starts at ``start + i * stage_length`` (``start``: e.g.
            the end of a preceding Quant-Noise or float phase).
        activation_aware: fit with sampled inputs of the current batch (max_sample_rows).
        forward_fn: f(pl_module, batch) running the model (activation sampling).
        lr_schedule: 'continue' or 'restart' after each optimizer rebuild.
        on_incomplete: 'quantize' (apply the stages the run did not reach at the end of fit)
            or 'error' (ConfigError before training when the schedule cannot fit).
    """

    def __init__(self, stages="fairseq_transformer", exclude=(), n_centroids: int = 256,
                 n_iter: int = 20, block_sizes=None, boundaries=None, stage_length: int = 1,
                 start: int = 0, unit: str = "epoch", activation_aware: bool = False,
                 max_sample_rows: int = 4096, forward_fn=None, lr_schedule: str = "continue",
                 seed: int = 0, clamp_centroids: bool = False,
                 on_incomplete: str = "quantize") -> None:
        super().__init__()
        if on_incomplete not in ON_INCOMPLETE:
            raise ConfigError(f"ipq.on_incomplete={on_incomplete!r}; allowed: {ON_INCOMPLETE}")
        self.on_incomplete = on_incomplete
        self._last_batch = None
        if isinstance(stages, str) and stages not in (*PRESETS, "cnn"):
            raise ValueError(f"ipq.stages={stages!r}; allowed presets: {[*PRESETS, 'cnn']} "
                             "or a list of regex groups")
        if unit not in UNITS:
            raise ValueError(f"ipq.unit={unit!r}; allowed: {UNITS}")
        if lr_schedule not in ("continue", "restart"):
            raise ValueError(f"ipq.lr_schedule={lr_schedule!r}; allowed: 'continue', 'restart'")
        self.stages_cfg, self.exclude = stages, as_patterns(exclude)
        self.n_centroids, self.n_iter, self.seed = n_centroids, n_iter, seed
        self.clamp_centroids = bool(clamp_centroids)
        self.k_for: dict[str, int] = {}
        self.blocks = {**DEFAULT_BLOCKS, **(block_sizes or {})}
        self.boundaries_cfg, self.stage_length, self.unit = boundaries, stage_length, unit
        if int(start) < 0:
            raise ValueError(f"ipq.start={start}: must be >= 0")
        self.start = int(start)
        self.activation_aware, self.max_sample_rows = activation_aware, max_sample_rows
        self.forward_fn = forward_fn or _default_forward
        self.lr_schedule = lr_schedule
        self.stage = 0
        self.codebooks: dict[str, dict] = {}
        self.plan: list[dict[str, int]] = []  # per stage: {layer name: block size}

    # -- planning -------------------------------------------------------------------------
    def _resolve(self, model: nn.Module) -> list[dict]:
        cfg = self.stages_cfg
        if isinstance(cfg, str):
            cfg = network_order_stages(model, self.exclude) if cfg == "cnn" else PRESETS[cfg]
        out = []
        for s in cfg:
            s = dict(s) if isinstance(s, Mapping) else {"include": as_patterns(s)}  # DictConfig too
            out.append(s)
        return out

    def setup(self, trainer, pl_module, stage=None) -> None:
        specs = self._resolve(pl_module)
        self.boundaries = list(self.boundaries_cfg or [
            self.start + i * int(self.stage_length) for i in range(len(specs))])
        if len(self.boundaries) != len(specs) or sorted(self.boundaries) != list(self.boundaries):
            raise ValueError(f"ipq.boundaries={self.boundaries}: need {len(specs)} "
                             "non-decreasing stage starts (one per stage)")
        seen, self.plan = set(), []
        for i, s in enumerate(specs):
            layers = self._select(pl_module, s, i)
            group = {}
            for name, m in layers.items():
                if name in seen:
                    continue
                bs = s.get("block_size") or default_block_size(name, m, self.blocks)
                self._validate(name, m, bs)
                group[name] = bs
                seen.add(name)
            if not group:
                raise LayerSelectionError(f"ipq.stages[{i}]: all matched layers belong to "
                                          "earlier stages")
            self.plan.append(group)
        pl_module.register_load_state_dict_pre_hook(self._rebuild_before_load)

    def _select(self, model, spec, i):
        types = TYPES + tuple({type(m) for m in model.modules() if is_pq(m)})
        return select_modules(model, spec["include"], self.exclude, types, f"ipq.stages[{i}]")

    def _validate(self, name, m, bs) -> None:
        w = m.weight
        KM.blocks_of(w, bs, name)  # block size divides the input dimension
        n_blocks = w.numel() // bs
        k = self.n_centroids
        if k > n_blocks and self.clamp_centroids:
            k = 2 ** max(0, (n_blocks // 4).bit_length() - 1)
        self.k_for[name] = k
        if k > n_blocks:
            raise ValueError(f"{name}: n_centroids={self.n_centroids} is larger than the number "
                             f"of sub-vectors {n_blocks} (block_size={bs}); exclude the layer "
                             "or lower n_centroids")

    def _rebuild_before_load(self, module, state_dict, prefix, *args) -> None:
        rebuild_pq_layers(module, state_dict, prefix)

    # -- stages ---------------------------------------------------------------------------
    def _now(self, trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def _last_reached(self, trainer) -> float:
        """The last epoch / step index at whose start a training batch runs (inf: no limit)."""
        total = trainer.estimated_stepping_batches  # optimizer steps of the whole fit
        if self.unit == "step":
            return total - 1
        per_epoch = trainer.num_training_batches
        if per_epoch == float("inf") or total == float("inf"):
            return float("inf") if trainer.max_epochs in (None, -1) else trainer.max_epochs - 1
        steps_per_epoch = max(1, math.ceil(per_epoch / trainer.accumulate_grad_batches))
        return (int(total) - 1) // steps_per_epoch

    def on_train_start(self, trainer, pl_module) -> None:
        if self.stage >= len(self.plan):
            return
        last = self._last_reached(trainer)
        late = [t for t in range(self.stage, len(self.plan)) if self.boundaries[t] > last]
        if not late:
            return
        what = (f"ipq stages {late} start at {self.unit}s {[self.boundaries[t] for t in late]}, "
                f"but this run's last {self.unit} is {last}")
        if self.on_incomplete == "error":
            raise ConfigError(f"{what} (ipq.boundaries / ipq.start / ipq.stage_length vs "
                              "trainer.max_steps / max_epochs); lengthen the run, move the stages "
                              "earlier, or set ipq.on_incomplete='quantize'")
        rank_zero_warn(f"{what}: they will be quantized at the end of fit without finetuning "
                       "(ipq.on_incomplete='quantize')")

    def on_train_end(self, trainer, pl_module) -> None:
        """Apply every stage the run did not reach (``on_incomplete='quantize'``)."""
        if self.on_incomplete != "quantize" or self.stage >= len(self.plan):
            self._last_batch = None
            return
        was = pl_module.training
        while self.stage < len(self.plan):
            with layer_report.event(trainer, self, f"stage{self.stage + 1}"):  # per-layer report
                self._apply_stage(trainer, pl_module, self.stage, self._last_batch)
            self.stage += 1
        pl_module.train(was)
        self._last_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.activation_aware:
            self._last_batch = batch  # for stages applied at the end of fit
        changed = False
        while self.stage < len(self.plan) and self._now(trainer) >= self.boundaries[self.stage]:
            with layer_report.event(trainer, self, f"stage{self.stage + 1}"):  # per-layer report
                self._apply_stage(trainer, pl_module, self.stage, batch)
            self.stage += 1
            changed = True
        if changed:
            self._rebuild_training(trainer, pl_module)

    def _sample_inputs(self, pl_module, names, batch) -> dict:
        store, handles = {}, []
        for n in names:
            m = pl_module.get_submodule(n)

            def hook(mod, inp, n=n):
                x = inp[0].detach()
                if isinstance(mod, nn.Conv2d):
                    x = unfold_inputs(mod, x, self.max_sample_rows)
                elif isinstance(mod, nn.Linear):
                    x = x.reshape(-1, x.shape[-1])
                    step = max(1, x.shape[0] // self.max_sample_rows)
                    x = x[::step][: self.max_sample_rows]
                store[n] = x
            handles.append(m.register_forward_pre_hook(hook))
        was = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                self.forward_fn(pl_module, batch)
        finally:
            pl_module.train(was)
            for h in handles:
                h.remove()
        return store

    def _fit_group(self, pl_module, t: int) -> dict[str, int]:
        """Layers of stage t to fit: not yet PQ (a tie may have quantized them already),
        one per shared weight Parameter."""
        group, seen = {}, set()
        for name, bs in self.plan[t].items():
            m = pl_module.get_submodule(name)
            w = m._parameters.get("weight")
            if is_pq(m) or (w is not None and id(w) in seen):
                continue
            seen.add(id(w))
            group[name] = bs
        return group

    def _apply_stage(self, trainer, pl_module, t: int, batch) -> None:
        group = self._fit_group(pl_module, t)
        fitted = None
        if trainer.global_rank == 0:
            if self.activation_aware and batch is None:  # no training batch ran in this fit
                rank_zero_warn(f"ipq stage {t}: no training batch to sample inputs from; "
                               "fitted with the plain ||W - W_hat||^2 objective")
            samples = (self._sample_inputs(pl_module, group, batch)
                       if self.activation_aware and batch is not None else {})
            fitted = {}
            for i, (name, bs) in enumerate(group.items()):
                m = pl_module.get_submodule(name)
                pq = pq_class_for(m).from_float(m, bs, self.k_for[name], self.n_iter,
                                                self.seed + 1000 * t + i, samples.get(name),
                                                name=name)
                fitted[name] = (pq.centroids.detach().cpu(), pq.assignments.cpu())
        fitted = trainer.strategy.broadcast(fitted, src=0)
        for name, (c, a) in fitted.items():
            old = pl_module.get_submodule(name)
            new = pq_from_state(old, c.to(old.weight.device, old.weight.dtype),
                                a.to(old.weight.device))
            partners = tied_partners(pl_module, old)
            set_submodule(pl_module, name, new)
            self.codebooks[name] = {"centroids": c, "assignments": a, "stage": t}
            for p in partners:
                set_submodule(pl_module, p, pq_tied(pl_module.get_submodule(p), new))
                self.codebooks[p] = {"tied_to": name, "stage": t}

    def _rebuild_training(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(strategy.model, DistributedDataParallel):  # new params: re-wrap
            strategy.model = strategy._setup_model(pl_module)
            if hasattr(strategy, "_register_ddp_hooks"):
                strategy._register_ddp_hooks()
        rebuild_optimizers(trainer, continue_schedule=self.lr_schedule == "continue")

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.stage, "codebooks": self.codebooks}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.codebooks = dict(state["codebooks"])

    def storage_bits(self, pl_module) -> int:
        """Bits of all PQ layers (indices + fp16 centroids + fp32 bias); a codebook shared by
        tied layers counts once (the tied layer adds only its own bias)."""
        total, seen = 0, set()
        for m in pl_module.modules():
            if not is_pq(m):
                continue
            if id(m.centroids) in seen:
                b = getattr(m, "bias", None)
                total += 32 * b.numel() if b is not None else 0
                continue
            seen.add(id(m.centroids))
            total += m.storage_bits()
        return total
