"""ELQ as a Lightning callback (Zhou, Yao, Wang & Chen 2018, "Explicit Loss-Error-Aware
Quantization for Low-Bit Deep Neural Networks", CVPR).

Definitions, assumptions and defaults: :mod:`qtrain.quant.elq`. Per stage t (``boundaries[t]``,
in epochs or optimizer steps), in every selected layer:

1. the accumulated portion ``schedule[t]`` of the weights becomes the quantized set (largest
   |W| first among the free weights, INQ's partition :func:`qtrain.quant.inq.grow_mask`, or
   ``'random'``; masks only grow);
2. the loss gradient g = dL/dW at the current float weights is the gradient of the stage's
   first training batch (taken in ``on_before_optimizer_step``: the batch's forward/backward
   ran on the unquantized weights, so g is exactly the Taylor expansion point's gradient);
3. alpha and the codes of the newly added weights are solved on V = W - g / lambda by the
   alternating optimisation (:func:`qtrain.quant.elq.solve`); codes quantized at earlier
   stages are kept, alpha is re-solved over the whole quantized set, and every quantized weight
   is set to alpha * c.

Quantized weights then stay fixed (their gradient is zeroed before each step and their value
written back after it by an optimizer step post-hook, as INQ); the free weights, BatchNorm and
biases keep training on the task loss. At the end every layer becomes a fake-quant layer with
:class:`qtrain.nn.elq_quantizer.ELQWeightQuantizer` (its alpha), so the evaluated and exported
model is the binary / ternary one, counted at 1 / 2 bits per weight + one fp32 alpha.

``reset_optimizer`` rebuilds optimizer and LR schedule after a stage; because the stage is
applied inside the optimizer step of its first batch, the rebuild happens at the start of the
next batch. Under DDP the gradients are already averaged over ranks, so every rank computes the
same masks and alpha (no broadcast). ``fp32_metric`` / ``fp32_state``: the last validation metric
before the first stage and the weights then (the run tests them as its FP32 row; written once
to the run dir, referenced by the checkpoints: :mod:`qtrain.callbacks.fp32_snapshot`).
"""

from __future__ import annotations

import json
import os

import pytorch_lightning as pl
import torch
from torch import nn

from qtrain import layer_report
from qtrain.callbacks.fp32_snapshot import KEY as SNAPSHOT_KEY
from qtrain.callbacks.fp32_snapshot import FP32Snapshot, state_property
from qtrain.callbacks.optimizer_hooks import hook_optimizer_steps
from qtrain.errors import ConfigError
from qtrain.nn.convert import as_patterns, select_modules
from qtrain.quant import elq as ELQ
from qtrain.quant import inq as INQ

LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
UNITS = ("epoch", "step")


class ELQCallback(pl.Callback):
    """Args:
        kind: 'binary' ({-1, +1} codes) or 'ternary' ({-1, 0, +1}).
        lam: lambda > 0, weight of the approximation error (V = W - g / lambda).
        schedule: accumulated portions (increasing, ending at 1.0).
        strategy: 'magnitude' (largest |W| first) or 'random'.
        exact: ternary codes by the exact minimum instead of the alternating optimisation.
        max_iter: bound on the alternating iterations.
        include / exclude: layer-name regexes; types: among 'Conv2d', 'Linear'.
        boundaries / start / stage_length / unit: stage starts as INQCallback.
        reset_optimizer: rebuild optimizer + LR scheduler after each later stage.
        seed: seed of the random partition.
        stages_file: where to write :attr:`history` as JSON at the end (None: not written).
    """

    fp32_state = state_property()  # module weights before the first stage

    def __init__(self, kind: str = "ternary", lam: float = ELQ.DEFAULT_LAMBDA,
                 schedule=tuple(ELQ.DEFAULT_SCHEDULE), strategy: str = "magnitude",
                 exact: bool = False, max_iter: int = 100,
                 include=(".*",), exclude=(), types=("Conv2d", "Linear"),
                 boundaries=None, stage_length: int = 1, start: int = 0, unit: str = "epoch",
                 reset_optimizer: bool = False, seed: int = 0,
                 convert_at_end: bool = True, stages_file: str | None = None) -> None:
        super().__init__()
        self.kind = ELQ.check_kind(kind)
        if not float(lam) > 0:
            raise ConfigError(f"elq.lam={lam}: must be > 0")
        if int(max_iter) < 1:
            raise ConfigError(f"elq.max_iter={max_iter}: must be >= 1")
        try:
            self.schedule = INQ.check_schedule(list(schedule))
        except ConfigError as e:
            raise ConfigError(str(e).replace("inq.", "elq.")) from None
        if strategy not in INQ.STRATEGIES:
            raise ConfigError(f"elq.strategy={strategy!r}; allowed: {INQ.STRATEGIES}")
        if unit not in UNITS:
            raise ConfigError(f"elq.unit={unit!r}; allowed: {UNITS}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"elq.types: {bad} unknown; allowed: {sorted(LAYER_TYPES)}")
        if boundaries is None:
            if int(start) < 0:
                raise ConfigError(f"elq.start={start}: must be >= 0")
            boundaries = [int(start) + i * int(stage_length) for i in range(len(self.schedule))]
        boundaries = [int(b) for b in boundaries]
        if len(boundaries) != len(self.schedule) or sorted(boundaries) != boundaries:
            raise ConfigError(f"elq.boundaries={boundaries}: need {len(self.schedule)} "
                              "non-decreasing stage starts (one per schedule entry)")
        self.lam, self.strategy, self.exact, self.max_iter = float(lam), strategy, exact, max_iter
        self.bits = ELQ.KINDS[self.kind]
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.types = tuple(LAYER_TYPES[t] for t in types)
        self.boundaries, self.unit, self.seed = boundaries, unit, seed
        self.reset_optimizer, self.convert_at_end = reset_optimizer, convert_at_end
        self.stages_file = stages_file
        self.stage = 0  # number of stages applied
        self._due = 0  # number of stages whose boundary has been reached
        self._rebuild = False
        self.masks: dict[str, torch.Tensor] = {}
        self.codes: dict[str, torch.Tensor] = {}
        self.alpha: dict[str, float] = {}
        # per stage and layer: alpha, iterations, first-order loss perturbation g.(W^ - W) and
        # approximation error ||W^ - W||^2 over the quantized set (E = pert. + lam/2 error)
        self.history: list[dict] = []
        self._layers: dict[str, nn.Module] = {}
        self._hooked: dict[int, object] = {}
        self.fp32_metric: float | None = None
        self.fp32_snapshot = FP32Snapshot("elq")

    # -- selection ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.fp32_snapshot.bind(trainer)
        self._layers = select_modules(pl_module, self.include, self.exclude, self.types, "elq")

    def validate(self, pl_module) -> None:
        """Before training (:mod:`qtrain.validation`): the layer selection."""
        select_modules(pl_module, self.include, self.exclude, self.types, "elq")

    def _weights(self):
        return {n: m.weight for n, m in self._layers.items()}

    # -- stages ---------------------------------------------------------------------------
    def _now(self, trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rebuild:
            trainer.strategy.setup_optimizers(trainer)
            self._rebuild = False
        if self.stage == 0 and self._due == 0 and self._now(trainer) >= self.boundaries[0]:
            value = trainer.callback_metrics.get(f"val_{getattr(pl_module, 'metric', 'acc')}")
            self.fp32_metric = float(value) if value is not None else None
            if self.fp32_metric is not None:  # the FP32 phase's weights, tested by the run
                self.fp32_snapshot.take(trainer, pl_module)
        due = self.stage
        while due < len(self.schedule) and self._now(trainer) >= self.boundaries[due]:
            due += 1
        self._due = due
        self._hook_optimizers(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._due > self.stage:
            first = self.stage
            with layer_report.event(trainer, self, f"stage{self._due}"):
                self._apply_stage(self._due - 1)
            self.stage = self._due
            self._rebuild = self.reset_optimizer and first > 0
        for name, w in self._weights().items():
            if name in self.masks and w.grad is not None:
                w.grad.masked_fill_(self.masks[name], 0.0)

    @torch.no_grad()
    def _apply_stage(self, t: int) -> None:
        portion = self.schedule[t]
        gen = torch.Generator().manual_seed(self.seed * 1000 + t)
        for name, w in self._weights().items():
            g = w.grad.detach() if w.grad is not None else torch.zeros_like(w)
            old = self.masks.get(name, torch.zeros_like(w, dtype=torch.bool))
            new = INQ.grow_mask(w, old, portion, self.strategy, gen)
            prev_codes = self.codes.get(name, torch.zeros_like(w))
            wf, gf = w.detach().float(), g.float()
            v = ELQ.target(wf[new], gf[new], self.lam)
            alpha, codes, iters = ELQ.solve(v, self.kind, old[new], prev_codes[new],
                                            self.max_iter, self.exact)
            all_codes = torch.zeros_like(wf)
            all_codes[new] = codes
            q = (alpha * all_codes.double()).to(w.dtype)
            d = q[new].double() - wf[new].double()
            self.masks[name], self.codes[name], self.alpha[name] = new, all_codes, float(alpha)
            self.history.append({"stage": t + 1, "layer": name, "portion": portion,
                                 "alpha": float(alpha), "iterations": iters,
                                 "perturbation": float((gf[new].double() * d).sum()),
                                 "approx_error": float((d * d).sum())})
            w.copy_(torch.where(new, q, w))

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        for name, w in self._weights().items():
            if name in self.masks:
                q = (self.alpha[name] * self.codes[name]).to(w.dtype)
                w.copy_(torch.where(self.masks[name], q, w))

    # -- enforcement ----------------------------------------------------------------------
    def _hook_optimizers(self, trainer) -> None:
        hook_optimizer_steps(trainer, self._hooked, self._restore_frozen)

    def on_train_start(self, trainer, pl_module) -> None:
        self._hook_optimizers(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        if self.stages_file and self.history and trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(self.stages_file)), exist_ok=True)
            with open(self.stages_file, "w") as f:  # the stages' numbers, per layer
                json.dump(self.history, f, indent=1)
        if self.convert_at_end:
            self.to_elq_layers(pl_module)

    def to_elq_layers(self, pl_module) -> None:
        """Swap every ELQ layer for a fake-quant layer with an :class:`ELQWeightQuantizer`
        holding its alpha (sharing the parameters). A layer whose last stage was not reached
        has its free weights mapped to the nearest alpha * c; one never quantized gets the
        alternating solution of its float weights (g = 0)."""
        from qtrain.nn.convert import set_submodule
        from qtrain.nn.elq_quantizer import ELQWeightQuantizer
        from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant

        for name, m in self._layers.items():
            if is_fake_quant(m):
                continue
            alpha = self.alpha.get(name)
            if alpha is None:
                alpha = float(ELQ.solve(m.weight.detach().float(), self.kind)[0])
            new = FAKE_QUANT_TYPES[type(m)].from_float(m, ELQWeightQuantizer(self.bits, alpha), None)
            set_submodule(pl_module, name, new)
            self._layers[name] = new
            if self.fp32_state is not None:  # the new quantizer's buffer (unused: quantizers off)
                self.fp32_state[f"{name}.weight_quantizer.alpha"] = new.weight_quantizer.alpha.clone()

    def quantized_fraction(self) -> float:
        tot = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / tot if tot else 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("elq_quantized_fraction", self.quantized_fraction(), sync_dist=False)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"stage": self.stage, "masks": cpu(self.masks), "codes": cpu(self.codes),
                "alpha": dict(self.alpha), "kind": self.kind, "schedule": self.schedule,
                "fp32_metric": self.fp32_metric, SNAPSHOT_KEY: self.fp32_snapshot.ref(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "schedule"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"elq: checkpoint {key} {state[key]} differs from the "
                                  f"configured {getattr(self, key)}")
        self.stage = self._due = int(state["stage"])
        self.fp32_metric = state.get("fp32_metric")
        self.fp32_snapshot.restore(state)
        self.history = list(state.get("history", []))
        weights = self._weights() if self._layers else {}
        dev = lambda n, v: v.to(weights[n].device) if n in weights else v  # noqa: E731
        self.masks = {n: dev(n, v) for n, v in state["masks"].items()}
        self.codes = {n: dev(n, v) for n, v in state["codes"].items()}
        self.alpha = {n: float(a) for n, a in state["alpha"].items()}
