"""Post-training vector quantization of trained weights as a Lightning callback (Gong, Liu,
Yang & Bourdev 2014, "Compressing Deep Convolutional Networks using Vector Quantization").

Once, at the start of epoch ``start_epoch`` (0: before any training step, i.e. on a pretrained
or loaded model; ``start_epoch >= max_epochs``: at the end of fit, after an FP32 phase; with
``fit=false`` before the first test / validation), every selected layer is replaced by one of

* ``binary`` (sec. 3.1): ``W_hat = alpha * sign(W)`` (sign(0) = +1) with ``alpha = mean|W|``
  per output row -- the least-squares scale for fixed signs (XNOR-Net's
  :class:`~qtrain.nn.format_quantizers.BinaryWeightQuantizer`). The paper writes the plain
  sign (no scale; ~, from memory, not re-verified); the per-row fp32 alpha is our choice.
* ``kmeans`` (sec. 3.2): scalar k-means of all weights of the layer into ``2^bits`` shared
  values (:class:`~qtrain.nn.kmeans_quantizer.KMeansWeightQuantizer`; init ``init``).
* ``pq`` (sec. 3.3): product quantization. The weight (out, in) (conv: in * kh * kw) is
  split into column segments of ``block_size`` consecutive input columns and, as in the
  paper, every segment gets its OWN k-means codebook of ``n_centroids`` fitted on that
  segment's ``out`` sub-vectors (``codebook='segment'``, default;
  :mod:`qtrain.quant.pq_segments`): storage ``out * S * ceil(log2 K)`` index bits + ``S``
  fp16 codebooks of K x block_size. ``codebook='shared'``: one codebook for all segments of
  the layer (as iPQ, Stock et al. 2019; the pre-issue-11 behaviour). Layers are
  :class:`~qtrain.nn.pq_layers.PQLinear` / ``PQConv2d`` (centroids rounded to fp16).
* ``rq`` (sec. 3.4): residual quantization, ``n_stages`` codebooks of ``n_centroids`` on the
  same sub-vectors, stage m fitted on the residual of stages 1..m-1
  (:mod:`qtrain.nn.rq_layers`).

No retraining (what distinguishes Gong 2014 from iPQ / Deep Compression): the parameters of
every quantized layer (codebooks and bias) are frozen (``requires_grad=False``). Layers not
selected stay float; if some remain and the run continues, only they train (the optimizer is
rebuilt); if nothing trainable is left, the fit stops right there.

Simplifications vs the paper: RQ works on the same
``block_size`` sub-vectors instead of whole rows; centroids are stored in fp16. Layers are
fitted on every rank with the same seeds (no broadcast: a multi-GPU run with
non-deterministic k-means is untested). Resume: the model's ``load_state_dict`` pre-hook
rebuilds kmeans / PQ / RQ layers from the checkpoint before the weights load; binary layers
(no extra tensors) are re-converted when the callback state loads.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from qtrain import layer_report
from qtrain.callbacks.optimizer_hooks import rebuild_optimizers
from qtrain.errors import ConfigError
from qtrain.nn.convert import as_patterns, select_modules, set_submodule
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES
from qtrain.nn.format_quantizers import BinaryWeightQuantizer
from qtrain.nn.kmeans_quantizer import KMeansWeightQuantizer
from qtrain.nn.pq_layers import pq_from_state, rebuild_pq_layers
from qtrain.nn.rq_layers import rebuild_rq_layers, rq_class_for
from qtrain.quant import kmeans as KM
from qtrain.quant import pq_segments as PS

log = logging.getLogger("qtrain")
METHODS = ("binary", "kmeans", "pq", "rq")
CODEBOOKS = ("segment", "shared")
LAYER_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


class VectorQuantizationCallback(pl.Callback):
    """Args:
        method: 'binary' | 'kmeans' | 'pq' | 'rq'.
        bits: kmeans: 2^bits shared values (1..8).
        n_centroids, block_size, n_stages: pq / rq codebook size K, sub-vector length and
            (rq) number of residual stages.
        codebook: pq only: 'segment' (one codebook per column segment, Gong 2014 sec. 3.3)
            or 'shared' (one per layer).
        clamp_centroids: a codebook with fewer sub-vectors than 4K (per segment: the layer's
            output rows) gets K = the largest power of two <= sub-vectors / 4 (tiny
            smoke-test models: ``${model.tiny}``; small layers of small models).
        include / exclude: module-name regexes (``re.fullmatch``); each must match a layer.
        types: layer types to consider ('Linear', 'Conv2d').
        start_epoch: epoch at whose start the layers are quantized (see module doc).
        n_iter, init, seed: k-means iterations, scalar init ('linear' | 'random'), seed.
    """

    def __init__(self, method: str = "pq", bits: int = 4, n_centroids: int = 256,
                 block_size: int = 8, n_stages: int = 2, include=(".*",), exclude=(),
                 types=("Linear",), start_epoch: int = 0, n_iter: int = 20,
                 init: str = "linear", seed: int = 0, clamp_centroids: bool = False,
                 codebook: str = "segment") -> None:
        super().__init__()
        if codebook not in CODEBOOKS:
            raise ConfigError(f"vector_quant.codebook={codebook!r}; allowed: {CODEBOOKS}")
        self.codebook = codebook
        if method not in METHODS:
            raise ValueError(f"vector_quant.method={method!r}; allowed: {METHODS}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad or not types:
            raise ValueError(f"vector_quant.types={list(types)}; allowed: {list(LAYER_TYPES)}")
        if method == "kmeans" and (not isinstance(bits, int) or not 1 <= bits <= 8):
            raise ValueError(f"vector_quant.bits={bits!r}; allowed for kmeans: 1..8")
        for key, v in (("n_centroids", n_centroids), ("block_size", block_size),
                       ("n_stages", n_stages)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"vector_quant.{key}={v!r}; must be a positive int")
        if method in ("pq", "rq") and n_centroids > 256:
            raise ValueError(f"vector_quant.n_centroids={n_centroids}; allowed 1..256 (uint8 "
                             "codes of the packed codebook / rq formats)")
        if init not in KM.INITS:
            raise ValueError(f"vector_quant.init={init!r}; allowed: {KM.INITS}")
        if int(start_epoch) < 0:
            raise ValueError(f"vector_quant.start_epoch={start_epoch}: must be >= 0")
        self.method, self.bits, self.n_centroids = method, bits, n_centroids
        self.block_size, self.n_stages, self.clamp_centroids = block_size, n_stages, clamp_centroids
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.types = tuple(LAYER_TYPES[t] for t in types)
        self.start_epoch, self.n_iter, self.init, self.seed = int(start_epoch), n_iter, init, seed
        # state
        self.applied = False
        self.applied_epoch: int | None = None
        self.layer_names: list[str] = []
        self.fp32_metric: float | None = None
        self._module: pl.LightningModule | None = None
        self._hooked = False

    # -- selection ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None) -> None:
        self._module = pl_module
        if not self.layer_names:  # a later setup (test after fit) sees the quantized layers
            chosen = select_modules(pl_module, self.include, self.exclude, self.types,
                                    "vector_quant")
            for name, m in chosen.items():
                self._check_layer(name, m)
            self.layer_names = list(chosen)
        if not self._hooked:
            pl_module.register_load_state_dict_pre_hook(self._rebuild_before_load)
            self._hooked = True

    def _k_for(self, n_blocks: int) -> int:
        k = self.n_centroids
        if self.clamp_centroids and k * 4 > n_blocks:
            k = min(k, 2 ** max(0, (n_blocks // 4).bit_length() - 1))
        return k

    def _per_segment(self) -> bool:
        return self.method == "pq" and self.codebook == "segment"

    def _sub_vectors(self, m: nn.Module) -> int:
        """Sub-vectors one codebook is fitted on: the layer's rows (per segment) or all."""
        return m.weight.shape[0] if self._per_segment() else m.weight.numel() // self.block_size

    def _check_layer(self, name: str, m: nn.Module) -> None:
        if self.method not in ("pq", "rq"):
            return
        KM.blocks_of(m.weight, self.block_size, name)  # block size divides the row length
        n = self._sub_vectors(m)
        if self._k_for(n) > n:
            what = (f"{n} (the layer's output rows: one codebook per column segment)"
                    if self._per_segment() else f"{n} (block_size={self.block_size})")
            raise ConfigError(f"{name}: n_centroids={self.n_centroids} is larger than the number "
                              f"of sub-vectors {what}; exclude the layer, lower n_centroids or "
                              "set clamp_centroids=true")

    # -- quantization ---------------------------------------------------------------------
    def quantized_layer(self, name: str, m: nn.Module, i: int) -> nn.Module:
        """The post-training quantized replacement of float layer ``m`` (frozen)."""
        seed = self.seed + i
        if self.method == "binary":
            new = FAKE_QUANT_TYPES[type(m)].from_float(m, BinaryWeightQuantizer(1), None)
        elif self.method == "kmeans":
            q = KMeansWeightQuantizer.fit(m.weight, self.bits, self.n_iter, seed, self.init, name)
            new = FAKE_QUANT_TYPES[type(m)].from_float(m, q, None)
        else:
            k = self._k_for(self._sub_vectors(m))
            if self._per_segment():
                c, a = PS.pq_fit_segments(m.weight.detach(), self.block_size, k, self.n_iter,
                                          seed, name)
                new = pq_from_state(m, c.half().float(), a)
            elif self.method == "pq":
                r = KM.pq_fit(m.weight.detach(), self.block_size, k, self.n_iter, seed, name=name)
                new = pq_from_state(m, r.centroids.half().float(), r.assignments)
            else:
                new = rq_class_for(m).from_float(m, self.block_size, self.n_stages, k,
                                                 self.n_iter, seed, name)
        for p in new.parameters():
            p.requires_grad_(False)
        return new

    @torch.no_grad()
    def apply(self, pl_module, epoch: int | None = None) -> None:
        for i, name in enumerate(self.layer_names):
            m = pl_module.get_submodule(name)
            set_submodule(pl_module, name, self.quantized_layer(name, m, i))
        self.applied, self.applied_epoch = True, epoch
        log.info("vector_quant: %s applied to %d layers (%s)", self.method,
                 len(self.layer_names), ", ".join(self.layer_names[:6]))

    def _record_fp32(self, trainer, pl_module) -> None:
        key = f"val_{getattr(pl_module, 'metric', 'acc')}"
        if key in trainer.callback_metrics:
            self.fp32_metric = float(trainer.callback_metrics[key])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.applied or trainer.current_epoch < self.start_epoch:
            return
        self._record_fp32(trainer, pl_module)
        with layer_report.event(trainer, self, "apply"):  # per-layer report
            self.apply(pl_module, trainer.current_epoch)
        if not any(p.requires_grad for p in pl_module.parameters()):
            log.info("vector_quant: no trainable parameter left (post-training); stopping fit")
            trainer.should_stop = True
            return
        rebuild_optimizers(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.applied:  # the FP32 phase ended before start_epoch: quantize now
            self._record_fp32(trainer, pl_module)
            with layer_report.event(trainer, self, "apply"):  # per-layer report
                self.apply(pl_module, trainer.current_epoch)

    def _apply_outside_fit(self, trainer, pl_module) -> None:
        if not self.applied and trainer.state.fn != TrainerFn.FITTING:
            self.apply(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._apply_outside_fit(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._apply_outside_fit(trainer, pl_module)

    # -- checkpoints ----------------------------------------------------------------------
    def _rebuild_before_load(self, module, state_dict, prefix, *args) -> None:
        """Give ``module`` the quantized layers a checkpoint holds (before its tensors load)."""
        names = rebuild_pq_layers(module, state_dict, prefix)
        names += rebuild_rq_layers(module, state_dict, prefix)
        for name, m in list(module.named_modules()):
            key = f"{prefix}{name}.weight_quantizer."
            if type(m) in FAKE_QUANT_TYPES and f"{key}codebook" in state_dict:
                q = KMeansWeightQuantizer(self.bits, state_dict[f"{key}codebook"],
                                          state_dict[f"{key}indices"])
                set_submodule(module, name, FAKE_QUANT_TYPES[type(m)].from_float(m, q, None))
                names.append(name)
        for name in names:
            for p in module.get_submodule(name).parameters():
                p.requires_grad_(False)

    def state_dict(self) -> dict:
        return {"applied": self.applied, "applied_epoch": self.applied_epoch,
                "method": self.method, "codebook": self.codebook,
                "layers": list(self.layer_names),
                "fp32_metric": self.fp32_metric}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(f"vector_quant: checkpoint was quantized with method="
                             f"{state['method']!r}, the run is configured with {self.method!r}")
        self.applied, self.applied_epoch = bool(state["applied"]), state["applied_epoch"]
        self.layer_names = list(state["layers"])
        self.fp32_metric = state.get("fp32_metric")
        if self.applied and self.method == "binary" and self._module is not None:
            for name in self.layer_names:  # no extra tensors: convert the loaded float layers
                m = self._module.get_submodule(name)
                if type(m) in FAKE_QUANT_TYPES:
                    new = FAKE_QUANT_TYPES[type(m)].from_float(m, BinaryWeightQuantizer(1), None)
                    for p in new.parameters():
                        p.requires_grad_(False)
                    set_submodule(self._module, name, new)

    def storage_bits(self, pl_module) -> int:
        """Bits of the quantized layers (each layer's own ``storage_bits()``)."""
        return sum(pl_module.get_submodule(n).storage_bits() for n in self.layer_names)
