"""Lightning callback: Hessian sensitivity analysis -> per-layer bits (HAWQ V1/V2, Q-BERT).

When: at ``on_train_start`` (before the first training step; the train dataloader exists
then) if ``at_epoch`` is None, else at the start of epoch ``at_epoch`` (after an FP32
phase of that many epochs). It takes the first ``num_batches`` batches of the train
dataloader as the calibration subset, runs :func:`qtrain.hessian.sensitivity.analyze`
on the fake-quant layers (QuantLinear/QuantConv2d built earlier by the quantization
callback) selected by ``include``/``exclude`` regexes, calls
``layer.weight_quantizer.set_bits(b)`` on each, and writes ``hessian_sensitivity.{csv,json,png}``
to ``trainer.log_dir`` (or ``default_root_dir``). Every logger gets the table
(``log_table`` where it exists, e.g. wandb), the chart (``log_image`` or TensorBoard's
``add_figure``) and ``hessian/avg_bits``.

By default all quantizers are disabled during the analysis (HAWQ analyses the float
model) and restored afterwards. The analysis runs under ``inference_mode(False)`` and
``enable_grad`` (:func:`qtrain.hessian.hvp.hessian_mode`), leaves BatchNorm statistics and
``.grad`` untouched (grads are None afterwards), uses the math attention kernel (the fused
SDPA kernels have no double backward). Under DDP only global rank 0 runs the analysis
(on its own shard of the train dataloader); its table and bits are broadcast and every
rank applies the same bits; only rank 0 writes the report and logs. ``state_dict`` holds the bits and table: a resumed run
re-applies them and does not recompute.

Stage-wise fine-tuning (HAWQ V1, Dong et al. 2019 sec. 3.3; ``stagewise``, default on for
``hawq_v1`` only): the analysis ranks the blocks by Omega_i = lambda_i * ||Q(W_i) - W_i||^2
at their chosen bits (descending; a tie group is one stage) and the blocks are quantized
one stage at a time: when the analysis ends every analysed layer's weight goes back to
float (its weight quantizer's output is replaced by its input through a forward hook, so
no other callback's ``enabled`` switch is touched; activations keep their quantizers),
stage 0 is quantized at once and stage t at ``t * stage_length`` epochs (or optimizer steps,
``stage_unit``) after the analysis; everything trains in between (quantized blocks through
the quantizer's STE). Stages the run does not reach are quantized at the end of fit, so
the tested / exported model is the fully quantized one (a warning says they got no
fine-tuning). Simplification: the paper does not say whether blocks quantized in earlier
stages keep training; here they do (QAT). ``stagewise=False``: all layers quantized at once.

``smoke=True`` (recipes pass ``${model.tiny}``) caps the estimators at 2 Hutchinson
iterations (min_iter = max_iter = 2, the least allowed) and one power iteration, and the
calibration subset at ``qbert_subsamples`` batches of ``SMOKE_SAMPLES`` samples, so a smoke
run exercises the whole code path in seconds; its sensitivities are not meaningful.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.nn.attention import SDPBackend, sdpa_kernel

from qtrain import layer_report
from qtrain.errors import ConfigError
from qtrain.hessian import report
from qtrain.hessian.sensitivity import SensitivityConfig, analyze
from qtrain.nn.convert import as_patterns, layer_name, network_prefix, rule_matcher, select_modules
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.quantizer_base import Quantizer

STAGE_UNITS = ("epoch", "step")


def _float_weight_hook(quantizer, args, output):
    """Forward hook: the weight quantizer returns its input (block not yet in its stage)."""
    return args[0]


def default_loss(module: torch.nn.Module, batch) -> torch.Tensor:
    """``module.hessian_loss(batch)`` if defined; else a TaskModule's own objective
    ``task_loss(module(inputs), targets)`` with ``split_batch`` (any batch layout, e.g. the
    dict batches of transformers models); else cross-entropy of ``module(x)`` vs y."""
    if hasattr(module, "hessian_loss"):
        return module.hessian_loss(batch)
    if hasattr(module, "split_batch") and hasattr(module, "task_loss"):
        inputs, targets = module.split_batch(batch)
        return module.task_loss(module(inputs), targets)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, y = batch
        return F.cross_entropy(module(x), y)
    raise ValueError(
        "HessianSensitivity: batches are not (inputs, targets) pairs; define "
        "`hessian_loss(batch)` on the LightningModule or pass loss_fn=callable(module, batch)"
    )


class HessianSensitivity(pl.Callback):
    """Args: see :class:`qtrain.hessian.sensitivity.SensitivityConfig` for the analysis
    options (method, bit_choices, budget_bits / average_bits, ties, mode, tol, max_iter, ...),
    plus ``num_batches``, ``at_epoch``, ``include``/``exclude`` (regexes over layer names
    relative to the network, the LightningModule's ``model``, as in every callback:
    ``layer1\\.0\\.conv1``; the old ``model\\.``-prefixed form warns),
    ``ties`` as lists of such regexes, ``loss_fn``, ``analyze_float``,
    ``stagewise`` (None: on for hawq_v1), ``stage_length`` / ``stage_unit`` ('epoch' |
    'step') and ``smoke`` (see the module docstring)."""

    FILE = "hessian_sensitivity"
    SMOKE_SAMPLES = 4

    def __init__(
        self,
        method: str = "hawq_v2",
        num_batches: int = 4,
        at_epoch: int | None = None,
        include: Sequence[str] = (".*",),
        exclude: Sequence[str] = (),
        ties: Sequence[Sequence[str]] = (),
        loss_fn: Callable | None = None,
        analyze_float: bool = True,
        smoke: bool = False,
        stagewise: bool | None = None,
        stage_length: int = 1,
        stage_unit: str = "epoch",
        **analysis,
    ) -> None:
        if stagewise is None:
            stagewise = method == "hawq_v1"
        if stagewise and method != "hawq_v1":
            raise ConfigError(f"hessian.stagewise=true needs method='hawq_v1' (the Omega order "
                              f"of HAWQ sec. 3.3), got method={method!r}")
        if not isinstance(stage_length, int) or stage_length < 1:
            raise ConfigError(f"hessian.stage_length must be an int >= 1, got {stage_length!r}")
        if stage_unit not in STAGE_UNITS:
            raise ConfigError(f"hessian.stage_unit={stage_unit!r}; allowed: {STAGE_UNITS}")
        self.stagewise, self.stage_length, self.stage_unit = bool(stagewise), stage_length, stage_unit
        self.stages: list[list[str]] = []  # HAWQ V1 fine-tuning stages, Omega descending
        self.stage = 0  # stages quantized so far
        self.stage_start = 0  # epoch / step of the analysis (stage 0)
        self._held: dict[str, object] = {}  # layer -> hook keeping its weight float
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"hessian.num_batches must be an int >= 1, got {num_batches!r}")
        if at_epoch is not None and (not isinstance(at_epoch, int) or at_epoch < 0):
            raise ValueError(f"hessian.at_epoch must be None or an int >= 0, got {at_epoch!r}")
        self.cfg = SensitivityConfig(method=method, **analysis)  # validates early
        if smoke:
            self.cfg.min_iter = self.cfg.max_iter = 2
            self.cfg.eig_max_iter = 1
            num_batches = min(num_batches, max(self.cfg.qbert_subsamples, 1))
        self.smoke = smoke
        self.num_batches, self.at_epoch = num_batches, at_epoch
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.tie_patterns = [list(t) for t in ties]
        self.loss_fn = loss_fn or default_loss
        self.analyze_float = analyze_float
        self.bits: dict[str, int] = {}
        self.rows: list[dict] = []
        self.done = False

    # ---------------------------------------------------------------- scheduling
    def on_train_start(self, trainer, pl_module) -> None:
        if self.done:
            self._upgrade_names(pl_module)
            self._apply(pl_module)
            self._hold(pl_module, [n for g in self.stages[self.stage:] for n in g])
        elif self.at_epoch is None:
            self.run(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self.done and self.at_epoch is not None and trainer.current_epoch >= self.at_epoch:
            self.run(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._advance(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stage < len(self.stages):
            late = self.stages[self.stage:]
            rank_zero_warn(f"HessianSensitivity: HAWQ stages {late} were not reached by the "
                           "run; quantized at the end of fit without fine-tuning")
            self._release([n for g in late for n in g])
            self.stage = len(self.stages)

    def _now(self, trainer) -> int:
        return trainer.current_epoch if self.stage_unit == "epoch" else trainer.global_step

    def _advance(self, trainer) -> None:
        """Quantize every stage whose start (stage_start + t * stage_length) has come."""
        while (self.stage < len(self.stages)
               and self._now(trainer) >= self.stage_start + self.stage * self.stage_length):
            self._release(self.stages[self.stage])
            self.stage += 1

    def _hold(self, pl_module, names) -> None:
        for n in names:
            if n not in self._held:
                wq = self._net(pl_module).get_submodule(n).weight_quantizer
                self._held[n] = wq.register_forward_hook(_float_weight_hook)

    def _release(self, names) -> None:
        for n in names:
            h = self._held.pop(n, None)
            if h is not None:
                h.remove()

    def state_dict(self) -> dict:
        return {"bits": dict(self.bits), "rows": list(self.rows), "done": self.done,
                "stages": [list(g) for g in self.stages], "stage": self.stage,
                "stage_start": self.stage_start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.bits = dict(state_dict["bits"])
        self.rows = list(state_dict["rows"])
        self.done = bool(state_dict["done"])
        self.stages = [list(g) for g in state_dict.get("stages", [])]
        self.stage = int(state_dict.get("stage", 0))
        self.stage_start = int(state_dict.get("stage_start", 0))

    # ---------------------------------------------------------------- analysis
    @staticmethod
    def _net(pl_module) -> torch.nn.Module:
        """The network whose module names the layer rules, bits and report use."""
        prefix = network_prefix(pl_module)
        return pl_module.get_submodule(prefix[:-1]) if prefix else pl_module

    def layers(self, pl_module) -> dict[str, torch.nn.Module]:
        """Selected fake-quant layers by name relative to the network (``layer1.0.conv1``,
        as every callback's include/exclude: :func:`qtrain.nn.convert.network_prefix`)."""
        prefix = network_prefix(pl_module)
        found = select_modules(pl_module, self.include, self.exclude,
                               types=(QuantLinear, QuantConv2d), key="hessian")
        return {layer_name(n, prefix): m for n, m in found.items()
                if m.weight_quantizer is not None}

    def _upgrade_names(self, pl_module) -> None:
        """State from a checkpoint written when the names carried the LightningModule
        prefix ('model.layer1.0.conv1'): the same layers by their network-relative names."""
        prefix, net = network_prefix(pl_module), self._net(pl_module)
        have = dict(net.named_modules())

        def fix(n: str) -> str:
            return layer_name(n, prefix) if n not in have else n

        self.bits = {fix(n): b for n, b in self.bits.items()}
        self.rows = [{**r, "layer": fix(r["layer"])} if "layer" in r else r for r in self.rows]
        self.stages = [[fix(n) for n in g] for g in self.stages]

    def _ties(self, names: list[str], prefix: str = "") -> list[list[str]]:
        ties, full = [], [prefix + n for n in names]
        for tie in self.tie_patterns:
            group = []
            for pat in tie:
                try:
                    match = rule_matcher(re.compile(pat), full, prefix, "hessian.ties")
                except re.error as e:
                    raise ConfigError(f"hessian.ties: invalid regex {pat!r}: {e}") from None
                hit = [n for n, f in zip(names, full) if match is not None and match(f)]
                if not hit:
                    raise ConfigError(f"hessian.ties: pattern {pat!r} matches no analysed layer "
                                      f"(layers are named like: {', '.join(names[:6])}, ...)")
                group += hit
            ties.append(list(dict.fromkeys(group)))
        return ties

    def _calibration(self, trainer, pl_module) -> list:
        loader = trainer.train_dataloader
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)):
            loader = loader[0]
        if loader is None:
            raise ValueError("HessianSensitivity: the trainer has no train dataloader")
        batches = []
        for b in loader:
            if self.smoke:
                b = apply_to_collection(b, torch.Tensor, lambda t: t[: self.SMOKE_SAMPLES])
            batches.append(trainer.strategy.batch_to_device(b, pl_module.device))  # + datamodule hooks
            if len(batches) == self.num_batches:
                break
        return batches

    def run(self, trainer, pl_module) -> None:
        """Analyse on global rank 0 only, broadcast ``(rows, bits)``, apply on every rank.

        Under DDP each rank's train dataloader holds a different shard, so ranks analysing
        their own batches would choose different bits; here rank 0 analyses its shard and
        the other ranks wait at the broadcast (they run no forward/backward). Validation
        that depends only on the config and model (layer selection, ties, SyncBatchNorm)
        runs on every rank, so a bad config fails everywhere; an error raised inside the
        analysis on rank 0 is broadcast too, so no rank hangs at the broadcast.
        """
        names = list(self.layers(pl_module))
        self.cfg.ties = self._ties(names, network_prefix(pl_module))
        self._check_sync_bn(trainer, pl_module)
        payload, error = None, None
        if trainer.is_global_zero:
            try:
                payload = ("ok", self._analyze(trainer, pl_module, names))
            except Exception as e:  # re-raised below after the other ranks are told
                error, payload = e, ("error", f"{type(e).__name__}: {e}")
        status, result = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise error
        if status == "error":
            raise RuntimeError(f"HessianSensitivity: the analysis on rank 0 failed: {result}")
        self.rows, self.bits = result
        self.done = True
        self._apply(pl_module)
        pre = network_prefix(pl_module)  # the layer report names layers of the LightningModule
        layer_report.notify(trainer, self, "bits", **{  # per-layer report columns
            c: {pre + r["layer"]: r.get(c) for r in self.rows} for c in ("curvature", "sensitivity")})
        if self.stagewise:
            order = sorted((r for r in self.rows if "stage" in r), key=lambda r: r["stage"])
            self.stages = [[r["layer"] for r in order if r["stage"] == i]
                           for i in dict.fromkeys(r["stage"] for r in order)]
            self.stage, self.stage_start = 0, self._now(trainer)
            self._hold(pl_module, [n for g in self.stages for n in g])
            self._advance(trainer)  # stage 0 now
        # Trainer.log_dir is itself a broadcast: every rank must read it, not rank 0 alone
        out = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._report(trainer, out)

    def _check_sync_bn(self, trainer, pl_module) -> None:
        if self.cfg.mode != "eval" and trainer.world_size > 1 and any(
                isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            raise ValueError(
                f"HessianSensitivity: mode={self.cfg.mode!r} with SyncBatchNorm under DDP "
                "would make rank 0's analysis wait for collectives of the other ranks; "
                "use hessian.mode='eval' or no sync_batchnorm"
            )

    def _analyze(self, trainer, pl_module, names: list[str]) -> tuple[list[dict], dict]:
        batches = self._calibration(trainer, pl_module)
        quantizers = [m for m in pl_module.modules() if isinstance(m, Quantizer)]
        flags = [q.enabled for q in quantizers]
        try:
            if self.analyze_float:
                for q in quantizers:
                    q.enabled = False
            # the fused SDPA kernels (flash / memory-efficient) have no double backward
            with sdpa_kernel(SDPBackend.MATH):
                return analyze(pl_module, names, batches, self.loss_fn, self.cfg,
                               root=self._net(pl_module))
        finally:
            for q, f in zip(quantizers, flags):
                q.enabled = f

    def _apply(self, pl_module) -> None:
        mods = dict(self._net(pl_module).named_modules())
        for name, b in self.bits.items():
            m = mods.get(name)
            if m is None or getattr(m, "weight_quantizer", None) is None:
                raise ValueError(
                    f"HessianSensitivity: layer {name!r} from the analysis/checkpoint has no "
                    "weight_quantizer in this model"
                )
            m.weight_quantizer.set_bits(int(b))

    # ---------------------------------------------------------------- output
    def _report(self, trainer, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        total = sum(r["numel"] for r in self.rows)
        avg = sum(r["numel"] * r["bits"] for r in self.rows) / total
        meta = {"method": self.cfg.method, "avg_bits": avg, "epoch": trainer.current_epoch,
                "bit_choices": list(self.cfg.bit_choices)}
        report.write_csv(self.rows, out / f"{self.FILE}.csv")
        report.write_json(self.rows, out / f"{self.FILE}.json", meta)
        png = out / f"{self.FILE}.png"
        fig = report.plot_png(self.rows, png, f"{self.cfg.method}: sensitivity and bits")
        cols = report.table_columns(self.rows)
        data = [[r.get(c) for c in cols] for r in self.rows]
        for lg in trainer.loggers:
            with contextlib.suppress(NotImplementedError):
                lg.log_metrics({"hessian/avg_bits": avg}, step=trainer.global_step)
            if hasattr(lg, "log_table"):
                lg.log_table(key="hessian/sensitivity", columns=cols, data=data)
            if hasattr(lg, "log_image"):
                lg.log_image(key="hessian/sensitivity_chart", images=[str(png)])
            elif hasattr(getattr(lg, "experiment", None), "add_figure"):
                lg.experiment.add_figure("hessian/sensitivity", fig, trainer.global_step)
        rank_zero_info(f"HessianSensitivity: {self.cfg.method} bits {self.bits} (avg {avg:.2f})")
