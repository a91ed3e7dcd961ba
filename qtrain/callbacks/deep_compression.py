"""Deep Compression as a Lightning callback (Han, Mao & Dally 2016, "Deep Compression:
Compressing Deep Neural Networks with Pruning, Trained Quantization and Huffman Coding").

One callback drives the three stages by epoch (epochs counted from ``start``):

1. Pruning (sec. 2) at each of ``prune_epochs``: every selected Conv2d / Linear weight is
   pruned by magnitude to ``target * (i + 1) / n`` at the i-th of n prune epochs (a single
   epoch prunes straight to the target; :mod:`qtrain.quant.pruning` for the exact count and
   ties). Retraining with the mask enforced: pruned gradients are zeroed before every
   optimizer step and pruned weights are written back to exactly 0 by an optimizer step
   post-hook (momentum / weight decay / Adam cannot revive them).
2. Trained quantization (sec. 3) at ``quantize_epoch``: per layer, scalar k-means over the
   *surviving* weights only (:func:`qtrain.quant.kmeans.scalar_kmeans`, linear
   initialisation between min and max by default, as the paper found best) with
   ``2^bits - 1`` shared values (paper AlexNet: 8 bits conv, 5 bits fc): the last code,
   ``2^bits - 1``, is reserved for filler zeros of the relative-index stream (our choice;
   the paper does not say how the zero is coded), so the stored stream decodes exactly. Fine-tuning: before
   every step the gradient of each surviving weight is replaced by its centroid's gradient
   ``dL/dC_k = sum_{i: code_i = k} dL/dW_i`` (eq. (3), Fig. 3), so every weight of a cluster
   receives the same update, i.e. the centroid moves by the optimizer's update for that
   summed gradient; after every step the weights are projected back onto
   ``C[codes]`` (``C_k`` = the cluster mean, identical to each member when the updates
   were identical) with pruned weights at 0. Codes never change. With
   ``reset_optimizer`` (default) the optimizer (and LR schedule, fast-forwarded) is rebuilt at
   this epoch so that no per-weight momentum from before the clustering remains: then the
   update is exactly the centroid update the paper describes, for SGD and Adam alike.
3. Size report (sec. 4): per layer the relative-index (``index_bits``, paper 8 conv / 5 fc,
   with filler zeros) and code bits, codebook, and the Huffman-coded code and index streams
   (:func:`qtrain.quant.pruning.sparse_layer_size`); logged after every stage and at the end
   as dense fp32 -> pruned -> pruned + shared -> + Huffman with the compression ratios, and
   written to ``<run dir>/deep_compression.json``. Two conventions (``paper_*`` keys): the
   paper's Tables 1-3 count the selected layers' weights only -- dense = 32 bits x #weights,
   compressed = code + relative-index streams + fp32 codebooks; biases are not counted (Table 3
   conv1: 500 weights, 66% kept, 8-bit codes, 5-bit indices, 256 fp32 centroids give its 78.5%
   only without the 20 fp32 biases) -- while ours (``*_compression``) is the whole model with
   every bias and every other parameter at fp32 in both columns. At the end of fit the
   Huffman column is also written as a file, ``<run dir>/deep_compression.dch``
   (``huffman_file``; :mod:`qtrain.quant.huffman`: the real canonical-Huffman bit streams,
   fp32 codebooks and biases of the compressed layers, decodable back to the weights) --
   the on-disk proof of the Huffman size; its byte count is in the report
   (``huffman_file_bytes``).

At the end of fit (``finalize_at_end``) a stage not yet reached is applied without retraining
and every layer becomes a fake-quant layer with a :class:`SharedWeightQuantizer` (no new
state-dict keys), so the run summary counts the pruned + shared size (relative indices
included) and its Huffman column codes the weight-code stream (the index stream stays at
``index_bits`` there; the callback's report has both Huffman streams).

Simplifications vs the paper: an exact per-layer sparsity instead of the std-scaled
threshold; a linear sparsity ramp for gradual pruning; the centroids are the cluster means
of the (shared) float weights instead of a separate parameter; the relative-index stream
runs over the whole row-major layer (no CSR row pointers); K = 2^bits - 1 centroids, the
code 2^bits - 1 marking a filler (see above); a layer with fewer surviving weights than
2^bits - 1 gets K = their number (filler code K, ``ceil(log2(K + 1))``-bit codes).
Empty clusters: by default (``split_empty=False``) plain Lloyd as eq. (2) with linear
initialisation: a centroid left without weights (a linear-init centroid in the gap that
pruning leaves around 0) keeps its value and stays unused, as the paper's k-means would;
``split_empty=True`` (named option) re-seeds it by splitting the most populated cluster
(:mod:`qtrain.quant.kmeans`): lower quantization error, but flatter code histograms, so
the Huffman-coded weight stream grows (real LeNet-300-100 fc1, 6 bits: 4.88 -> 5.14 bits
per entry).
Under DDP the masks and codebooks of rank 0 are broadcast after every stage
(untested here: no multi-process test). ``export=true`` writes each layer in the
``sparse_shared`` packed format (:mod:`qtrain.nn.packed_sparse`). State (stage, masks, codes, centroids, the FP32 snapshot) is in
``state_dict`` for resuming (codes as uint8 / int32, the FP32 snapshot as a reference to its file
in the run dir: :mod:`qtrain.callbacks.fp32_snapshot`); a resumed run never re-prunes or
re-clusters.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytorch_lightning as pl
import torch
from torch import nn

from qtrain import layer_report
from qtrain.callbacks.fp32_snapshot import KEY as SNAPSHOT_KEY
from qtrain.callbacks.fp32_snapshot import FP32Snapshot, state_property
from qtrain.callbacks.optimizer_hooks import hook_optimizer_steps, rebuild_optimizers
from qtrain.errors import ConfigError
from qtrain.nn.convert import (
    as_patterns,
    layer_name,
    network_prefix,
    rule_matcher,
    select_modules,
    set_submodule,
)
from qtrain.nn.shared_weight_quantizer import SharedWeightQuantizer
from qtrain.quant import kmeans as KM
from qtrain.quant import pruning as P

log = logging.getLogger("qtrain")
LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


def _kind(m: nn.Module) -> str:
    return "Conv2d" if isinstance(m, nn.Conv2d) else "Linear"


class DeepCompressionCallback(pl.Callback):
    """Args:
        sparsity: target sparsity per layer type {'Linear': s, 'Conv2d': s}.
        layer_sparsity: {regex: s} overrides (first full match wins; each must match a layer).
        bits / layer_bits: weight-sharing bits per type / regex overrides (K = 2^bits - 1
            centroids; code 2^bits - 1 marks a filler zero).
        index_bits: relative-index bits per type (paper: Conv2d 8, Linear 5).
        include / exclude: module-name regexes of the Conv2d / Linear layers to compress.
        start: epoch offset of the schedule (e.g. ``${quant_start_epoch}``).
        prune_epochs: epochs (from ``start``) of the gradual pruning steps.
        quantize_epoch: epoch (from ``start``) of the k-means weight sharing; null: only at
            the end of fit. n_iter, init, seed: scalar k-means options.
        reset_optimizer: rebuild optimizer + LR schedulers (fast-forwarded) at quantization.
        split_empty: k-means re-seeds empty clusters (default False: plain Lloyd, module
            docstring).
        finalize_at_end: apply unreached stages at the end of fit and convert the layers.
        report_file: JSON file name in the run directory (null: none).
        huffman_file: Huffman-coded file of the compressed layers in the run directory
            (null: none; :mod:`qtrain.quant.huffman`).
    """

    fp32_state = state_property()  # module weights before the first prune

    def __init__(self, sparsity=None, layer_sparsity=None, bits=None, layer_bits=None,
                 index_bits=None, include=(".*",), exclude=(), start: int = 0,
                 prune_epochs=(0,), quantize_epoch: int | None = 1, n_iter: int = 20,
                 init: str = "linear", reset_optimizer: bool = True, seed: int = 0,
                 split_empty: bool = False,
                 finalize_at_end: bool = True,
                 report_file: str | None = "deep_compression.json",
                 huffman_file: str | None = "deep_compression.dch") -> None:
        super().__init__()
        self.sparsity = dict(sparsity or {"Linear": 0.9, "Conv2d": 0.6})
        self.bits_cfg = dict(bits or {"Linear": 5, "Conv2d": 8})
        self.index_bits_cfg = dict(index_bits or {"Linear": 5, "Conv2d": 8})
        self.layer_sparsity, self.layer_bits = dict(layer_sparsity or {}), dict(layer_bits or {})
        for key, d in (("sparsity", self.sparsity), ("bits", self.bits_cfg),
                       ("index_bits", self.index_bits_cfg)):
            bad = [k for k in d if k not in LAYER_TYPES]
            if bad:
                raise ConfigError(f"deep_compression.{key}: unknown layer types {bad}; "
                                  f"allowed: {sorted(LAYER_TYPES)}")
        if int(start) < 0:
            raise ConfigError(f"deep_compression.start={start}: must be >= 0")
        self.prune_epochs = [int(e) for e in prune_epochs]
        if not self.prune_epochs or sorted(self.prune_epochs) != self.prune_epochs \
                or min(self.prune_epochs) < 0:
            raise ConfigError(f"deep_compression.prune_epochs={list(prune_epochs)}: need a "
                              "non-empty, non-decreasing list of epochs >= 0")
        if quantize_epoch is not None and int(quantize_epoch) < self.prune_epochs[-1]:
            raise ConfigError(f"deep_compression.quantize_epoch={quantize_epoch}: must be >= "
                              f"the last prune epoch {self.prune_epochs[-1]} (or null)")
        if init not in KM.INITS:
            raise ConfigError(f"deep_compression.init={init!r}; allowed: {KM.INITS}")
        self.start = int(start)
        self.quantize_epoch = None if quantize_epoch is None else int(quantize_epoch)
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.n_iter, self.init, self.seed = int(n_iter), init, int(seed)
        self.split_empty = bool(split_empty)
        self.reset_optimizer, self.finalize_at_end = reset_optimizer, finalize_at_end
        self.report_file, self.huffman_file = report_file, huffman_file
        # state
        self.n_prune_steps = 0
        self.quantized = False
        self.masks: dict[str, torch.Tensor] = {}
        self.codes: dict[str, torch.Tensor] = {}
        self.centroids: dict[str, torch.Tensor] = {}
        self.fp32_metric: float | None = None
        self.fp32_snapshot = FP32Snapshot("deep_compression")
        self.report: dict | None = None
        self._layers: dict[str, nn.Module] = {}
        self._prefix = ""  # convert.network_prefix of the LightningModule (set in setup)
        self._cfg: dict[str, dict] = {}
        self._hooked: dict[int, object] = {}

    # -- configuration --------------------------------------------------------------------
    def _resolve(self, name: str, m: nn.Module, by_type: dict, overrides: dict, key: str):
        for pat, v in overrides.items():  # network-relative name; the old prefixed form too
            if re.fullmatch(pat, layer_name(name, self._prefix)) or re.fullmatch(pat, name):
                return v
        if _kind(m) not in by_type:
            raise ConfigError(f"deep_compression.{key}: no value for layer {name} ({_kind(m)}); "
                              f"set deep_compression.{key}.{_kind(m)} or an override")
        return by_type[_kind(m)]

    def setup(self, trainer, pl_module, stage=None) -> None:
        self.fp32_snapshot.bind(trainer)
        self._layers = select_modules(pl_module, self.include, self.exclude,
                                      tuple(LAYER_TYPES.values()), "deep_compression")
        self._prefix = network_prefix(pl_module)
        if self._cfg:
            return
        for key, over in (("layer_sparsity", self.layer_sparsity), ("layer_bits", self.layer_bits)):
            for pat in over:
                if rule_matcher(re.compile(pat), self._layers, self._prefix,
                                f"deep_compression.{key}") is None:
                    raise ConfigError(f"deep_compression.{key}: pattern {pat!r} matches no "
                                      f"selected layer ({', '.join(layer_name(n, self._prefix) for n in list(self._layers)[:6])})")
        for name, m in self._layers.items():
            s = self._resolve(name, m, self.sparsity, self.layer_sparsity, "sparsity")
            b = self._resolve(name, m, self.bits_cfg, self.layer_bits, "bits")
            ib = self._resolve(name, m, self.index_bits_cfg, {}, "index_bits")
            P._check_sparsity(s, f"deep_compression layer {name}")
            for what, v in (("bits", b), ("index_bits", ib)):
                if not isinstance(v, int) or not 1 <= v <= 16:
                    raise ConfigError(f"deep_compression.{what}={v!r} for layer {name}; "
                                      "allowed: an int in 1..16")
            self._cfg[name] = {"sparsity": float(s), "bits": b, "index_bits": ib}

    def validate(self, pl_module) -> None:
        """Before training (:mod:`qtrain.validation`): the layer selection and every
        layer's sparsity / bits / index bits, as :meth:`setup` resolves them, then forgotten."""
        kept = self._layers, self._cfg
        self._cfg = {}
        try:
            self.setup(None, pl_module)
        finally:
            self._layers, self._cfg = kept

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: m.weight for n, m in self._layers.items()}

    # -- stages ---------------------------------------------------------------------------
    @torch.no_grad()
    def prune_step(self, i: int) -> None:
        """Prune every layer to ``target * (i + 1) / len(prune_epochs)``."""
        n = len(self.prune_epochs)
        for name, w in self._weights().items():
            s = P.sparsity_ramp(self._cfg[name]["sparsity"], n)[i]
            mask = P.magnitude_mask(w, s, self.masks.get(name), name=name)
            self.masks[name] = mask
            w.masked_fill_(~mask, 0.0)
        self.n_prune_steps = i + 1

    @torch.no_grad()
    def quantize(self) -> None:
        """k-means weight sharing of the surviving weights of every layer (codes fixed)."""
        for i, (name, w) in enumerate(self._weights().items()):
            mask = self.masks.get(name)
            if mask is None:
                mask = self.masks[name] = torch.ones_like(w, dtype=torch.bool)
            surv = w[mask].float()
            bits = self._cfg[name]["bits"]
            k = min(2**bits - 1, surv.numel())  # code 2^bits - 1: filler zeros
            c, a = KM.scalar_kmeans(surv, bits, self.n_iter, self.seed + i, name=name,
                                    init=self.init, n_centroids=k,
                                    split_empty=self.split_empty)
            codes = torch.zeros(w.shape, dtype=torch.long, device=w.device)
            codes[mask] = a
            self.codes[name], self.centroids[name] = codes, c.float()
            w.copy_(P.shared_weight(self.centroids[name], codes, mask).to(w.dtype))
        self.quantized = True

    def _due(self, epoch: int):
        prunes = [i for i in range(self.n_prune_steps, len(self.prune_epochs))
                  if epoch >= self.start + self.prune_epochs[i]]
        quant = (not self.quantized and self.quantize_epoch is not None
                 and epoch >= self.start + self.quantize_epoch)
        return prunes, quant

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        prunes, quant = self._due(trainer.current_epoch)
        if prunes and self.n_prune_steps == 0 and trainer.current_epoch > 0:
            key = f"val_{getattr(pl_module, 'metric', 'acc')}"
            if key in trainer.callback_metrics:
                self.fp32_metric = float(trainer.callback_metrics[key])
            self.fp32_snapshot.take(trainer, pl_module)
        for i in prunes:
            with layer_report.event(trainer, self, f"prune{i + 1}"):  # per-layer report
                self.prune_step(i)
        if quant:
            with layer_report.event(trainer, self, "quantize"):
                self.quantize()
            if self.reset_optimizer:
                rebuild_optimizers(trainer)
        if prunes or quant:
            self._sync(trainer)
            self._log_report(trainer)
        self._hook_optimizers(trainer)

    def _sync(self, trainer) -> None:
        """DDP: every rank takes rank 0's masks / codes / centroids (k-means on a GPU is not
        bit-reproducible across ranks) and rewrites its weights from them."""
        if trainer.world_size <= 1:
            return
        cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
        st = trainer.strategy.broadcast(
            (cpu(self.masks), cpu(self.codes), cpu(self.centroids)), src=0)
        w = self._weights()
        self.masks, self.codes, self.centroids = (
            {n: v.to(w[n].device) for n, v in d.items()} for d in st)
        with torch.no_grad():
            for n, mask in self.masks.items():
                if self.quantized:
                    w[n].copy_(P.shared_weight(self.centroids[n], self.codes[n], mask))
                else:
                    w[n].masked_fill_(~mask, 0.0)

    # -- enforcement ----------------------------------------------------------------------
    def _hook_optimizers(self, trainer) -> None:
        hook_optimizer_steps(trainer, self._hooked, self.enforce)

    def on_train_start(self, trainer, pl_module) -> None:
        self._hook_optimizers(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, w in self._weights().items():
            if name not in self.masks or w.grad is None:
                continue
            mask = self.masks[name]
            if self.quantized:
                k = self.centroids[name].numel()
                g = P.centroid_grad(w.grad, self.codes[name], mask, k)
                w.grad.copy_(P.shared_weight(g, self.codes[name], mask).to(w.grad.dtype))
            else:
                w.grad.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def enforce(self) -> None:
        """After a step: pruned weights to 0; when quantized, weights back onto ``C[codes]``."""
        for name, w in self._weights().items():
            if name not in self.masks:
                continue
            mask = self.masks[name]
            if self.quantized:
                c = P.cluster_means(w, self.codes[name], mask, self.centroids[name])
                self.centroids[name] = c
                w.copy_(P.shared_weight(c, self.codes[name], mask).to(w.dtype))
            else:
                w.masked_fill_(~mask, 0.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.masks:
            kept = sum(int(m.sum()) for m in self.masks.values())
            pl_module.log("dc_kept_fraction", kept / sum(m.numel() for m in self.masks.values()),
                          sync_dist=False)

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        if not self.finalize_at_end:
            return
        with layer_report.event(trainer, self, "finalize"):  # reported if a stage was left
            for i in range(self.n_prune_steps, len(self.prune_epochs)):
                self.prune_step(i)
            if not self.quantized:
                self.quantize()
        self.convert(pl_module)
        self._log_report(trainer, final=True)

    def convert(self, pl_module) -> None:
        """Swap every layer for a fake-quant layer with a :class:`SharedWeightQuantizer`."""
        from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant

        for name, m in list(self._layers.items()):
            if is_fake_quant(m):
                continue
            c = self.centroids[name]
            q = SharedWeightQuantizer(P.code_bits_for(c.numel()), c, self.codes[name],
                                      self.masks[name], self._cfg[name]["index_bits"])
            new = FAKE_QUANT_TYPES[type(m)].from_float(m, q, None)
            set_submodule(pl_module, name, new)
            self._layers[name] = new

    # -- size report ----------------------------------------------------------------------
    def size_report(self, pl_module) -> dict:
        """Per layer :class:`~qtrain.quant.pruning.SparseLayerSize` and model totals (bits)
        for dense fp32 -> pruned -> pruned + shared -> + Huffman; parameters outside the
        selected layers count fp32 in every column."""
        layers = {}
        for name, m in self._layers.items():
            mask = self.masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
            codes = self.codes.get(name)
            k = self.centroids[name].numel() if codes is not None else 0
            nb = m.bias.numel() if getattr(m, "bias", None) is not None else 0
            layers[name] = P.sparse_layer_size(mask, codes, k, self._cfg[name]["index_bits"],
                                               nb, name).as_dict()
        params = {id(p): p for p in pl_module.parameters()}
        total = 32 * sum(p.numel() for p in params.values())
        other = total - sum(r["dense_bits"] for r in layers.values())
        tot = {c: other + sum(r[f"{c}_bits"] for r in layers.values())
               for c in ("dense", "pruned", "shared", "huffman")}
        ratio = {f"{c}_compression": tot["dense"] / tot[c] for c in tot}
        # the paper's convention (module docstring): selected layers' weights only, no biases
        pap = {c: sum(r[f"{c}_bits"] - 32 * r["bias_numel"] for r in layers.values())
               for c in ("dense", "pruned", "shared", "huffman")}
        pratio = {f"paper_{c}_compression": pap["dense"] / pap[c] for c in pap}
        return {"layers": layers, "other_bits": other,
                **{f"{c}_bits": v for c, v in tot.items()}, **ratio,
                **{f"paper_{c}_bits": v for c, v in pap.items()}, **pratio}

    def _log_report(self, trainer, final: bool = False) -> None:
        self.report = self.size_report(trainer.lightning_module)
        log.info("deep compression (%s):\n%s", "final" if final else
                 f"epoch {trainer.current_epoch}", format_report(self.report))
        if final and self.huffman_file and trainer.is_global_zero:
            self.report["huffman_file_bytes"] = self.write_huffman_file(
                os.path.join(trainer.default_root_dir, self.huffman_file))
            log.info("deep compression: Huffman-coded layers %s: %d bytes (%.1fx the fp32 "
                     "weights)", self.huffman_file, self.report["huffman_file_bytes"],
                     self.report["paper_dense_bits"] / 8 / self.report["huffman_file_bytes"])
        if final and self.report_file and trainer.is_global_zero:
            path = os.path.join(trainer.default_root_dir, self.report_file)
            with open(path, "w") as f:
                json.dump(self.report, f, indent=2)

    def write_huffman_file(self, path: str) -> int:
        """The compressed layers as Huffman-coded streams + fp32 codebooks and biases
        (:func:`qtrain.quant.huffman.write_dc_file`); returns the file's size in bytes."""
        from qtrain.quant.huffman import write_dc_file

        return write_dc_file(path, {
            name: {"mask": self.masks[name], "codes": self.codes[name],
                   "centroids": self.centroids[name],
                   "index_bits": self._cfg[name]["index_bits"],
                   "bias": getattr(m, "bias", None)}
            for name, m in self._layers.items()})

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"n_prune_steps": self.n_prune_steps, "quantized": self.quantized,
                "masks": cpu(self.masks), "codes": {n: _narrow(c).cpu() for n, c in self.codes.items()},
                "centroids": cpu(self.centroids), "fp32_metric": self.fp32_metric,
                SNAPSHOT_KEY: self.fp32_snapshot.ref(), "prune_epochs": self.prune_epochs}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("prune_epochs", self.prune_epochs)) != self.prune_epochs:
            raise ConfigError(f"deep_compression: checkpoint prune_epochs {state['prune_epochs']} "
                              f"differ from the configured {self.prune_epochs}")
        self.n_prune_steps, self.quantized = int(state["n_prune_steps"]), bool(state["quantized"])
        w = self._weights()
        dev = lambda n, v: v.to(w[n].device) if n in w else v  # noqa: E731
        self.masks = {n: dev(n, v) for n, v in state["masks"].items()}
        self.codes = {n: dev(n, v.long()) for n, v in state["codes"].items()}  # stored narrow
        self.centroids = {n: dev(n, v) for n, v in state["centroids"].items()}
        self.fp32_metric = state.get("fp32_metric")
        self.fp32_snapshot.restore(state)


def _narrow(codes: torch.Tensor) -> torch.Tensor:
    """Checkpoint form of a layer's codes (0 .. K <= 2^16 - 1): uint8 when K < 256, else int32,
    instead of int64 (8 bytes a weight: twice the float layer); loaded back as int64."""
    return codes.to(torch.uint8 if int(codes.max()) < 256 else torch.int32) if codes.numel() else codes


def format_report(r: dict) -> str:
    """Table: per layer kept %, bits, and the sizes of every stage; totals with ratios."""
    w = max([len(n) for n in r["layers"]] + [5])
    head = (f"{'layer':<{w}} {'numel':>9} {'kept%':>6} {'fill':>6} {'w/i bits':>8} "
            f"{'dense KB':>9} {'pruned KB':>9} {'shared KB':>9} {'Huff KB':>8} "
            f"{'huffW b/e':>9} {'huffI b/e':>9}")
    lines = [head]
    for n, x in r["layers"].items():
        e = max(1, x["nnz"] + x["fillers"])
        lines.append(
            f"{n:<{w}} {x['numel']:>9} {100 * x['nnz'] / x['numel']:>6.2f} {x['fillers']:>6} "
            f"{x['code_bits'] or 32:>3}/{x['index_bits']:<4} {x['dense_bits'] / 8e3:>9.2f} "
            f"{x['pruned_bits'] / 8e3:>9.2f} {x['shared_bits'] / 8e3:>9.2f} "
            f"{x['huffman_bits'] / 8e3:>8.2f} {x['huffman_weight_bits'] / e:>9.2f} "
            f"{x['huffman_index_bits'] / e:>9.2f}")
    lines.append(
        f"total: dense fp32 {r['dense_bits'] / 8e3:.2f} KB -> pruned {r['pruned_bits'] / 8e3:.2f} KB "
        f"({r['pruned_compression']:.1f}x) -> pruned+shared {r['shared_bits'] / 8e3:.2f} KB "
        f"({r['shared_compression']:.1f}x) -> +Huffman {r['huffman_bits'] / 8e3:.2f} KB "
        f"({r['huffman_compression']:.1f}x)")
    if "paper_dense_bits" in r:
        lines.append(
            f"paper's convention (weights only, no biases): {r['paper_dense_bits'] / 8e3:.2f} KB "
            f"-> pruned {r['paper_pruned_compression']:.1f}x -> pruned+shared "
            f"{r['paper_shared_bits'] / 8e3:.2f} KB ({r['paper_shared_compression']:.1f}x) -> "
            f"+Huffman {r['paper_huffman_bits'] / 8e3:.2f} KB ({r['paper_huffman_compression']:.1f}x)")
    return "\n".join(lines)
