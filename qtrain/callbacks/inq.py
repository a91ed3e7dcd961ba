"""INQ as a Lightning callback (Zhou et al. 2017, "Incremental Network Quantization").

At the start of stage t (``boundaries[t]``, in epochs or optimizer steps) every selected
layer freezes an accumulated portion ``schedule[t]`` of its weights at the nearest INQ
power-of-two level (:mod:`qtrain.quant.inq`); the other weights keep training. Frozen
weights never change afterwards, whatever the optimizer:
* their gradient is zeroed before the step (``on_before_optimizer_step``, eq. 7), and
* their frozen value is written back right after every ``optimizer.step()`` by an optimizer
  step post-hook (so momentum, weight decay and Adam moments cannot move them).
Masks only grow. Layers are selected by module *type* (Conv2d / Linear weights; BatchNorm
and biases are never quantized) and optional name regexes (each must match a layer).

Options: ``reset_optimizer`` rebuilds optimizer and LR schedule at each stage after the
first (the paper retrains every stage with the initial learning-rate policy). Under DDP
the masks are computed on rank 0 and broadcast. State (stage, levels, and per weight the
index of its frozen level or :data:`NOT_FROZEN`: one byte, which also gives the mask) is in
``state_dict`` for resuming (:func:`frozen_index`; checkpoints with the older float ``frozen``
copy + ``masks`` still load).

``fp32_metric`` (read by the run summary): the module's last validation metric before the
first stage (the end of the FP32 phase), None when INQ starts at step/epoch 0; ``fp32_state``:
the module's weights at that moment (the run summary tests them: its FP32 test row), written
once to the run dir and referenced by the checkpoints (:mod:`qtrain.callbacks.fp32_snapshot`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from qtrain import layer_report
from qtrain.callbacks.fp32_snapshot import KEY as SNAPSHOT_KEY
from qtrain.callbacks.fp32_snapshot import FP32Snapshot, state_property
from qtrain.callbacks.optimizer_hooks import hook_optimizer_steps
from qtrain.errors import ConfigError
from qtrain.nn.convert import as_patterns, select_modules
from qtrain.quant import inq as INQ

LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
UNITS = ("epoch", "step")
NOT_FROZEN = 255  # checkpoint level index of a free weight (a layer has <= 129 levels)


def frozen_index(frozen: torch.Tensor, mask: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Checkpoint form of a layer's frozen weights: the uint8 index into its sorted ``levels``
    of each frozen value, :data:`NOT_FROZEN` where ``mask`` is False (one byte per weight
    instead of a float copy of the layer plus a bool mask). Frozen values are always levels
    (they come from ``round_to_levels``); anything else is a bug and raises."""
    idx = torch.searchsorted(levels, frozen.contiguous()).clamp_(max=levels.numel() - 1)
    if levels.numel() >= NOT_FROZEN or not torch.equal(levels[idx][mask], frozen[mask]):
        raise RuntimeError("inq: a frozen weight is not one of its layer's levels")
    return torch.where(mask, idx, NOT_FROZEN).to(torch.uint8)


def from_frozen_index(index: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, frozen values; 0 where not frozen, dtype of ``levels``) from :func:`frozen_index`."""
    mask = index != NOT_FROZEN
    return mask, torch.where(mask, levels[index.long() * mask], torch.zeros((), dtype=levels.dtype))


class INQCallback(pl.Callback):
    """Args:
        bits: INQ bit width (2..8; levels per pow2.inq_levels).
        schedule: accumulated portions (list) or a name in ``qtrain.quant.inq.SCHEDULES``.
        strategy: 'magnitude' (largest first) or 'random'.
        include / exclude: module-name regexes; types: among 'Conv2d', 'Linear'.
        boundaries: start of each stage (len == len(schedule)); default
            ``[start + i * stage_length]``. unit: 'epoch' or 'step' (optimizer steps).
        reset_optimizer: rebuild optimizer + LR scheduler at each later stage.
        seed: seed of the random partition.
    """

    fp32_state = state_property()  # module weights before the first stage

    def __init__(self, bits: int = 5, schedule="5bit", strategy: str = "magnitude",
                 include=(".*",), exclude=(), types=("Conv2d", "Linear"),
                 boundaries=None, stage_length: int = 1, start: int = 0,
                 unit: str = "epoch",
                 reset_optimizer: bool = False, seed: int = 0,
                 convert_at_end: bool = True) -> None:
        super().__init__()
        self.convert_at_end = convert_at_end
        self.schedule = INQ.check_schedule(schedule)
        if strategy not in INQ.STRATEGIES:
            raise ConfigError(f"inq.strategy={strategy!r}; allowed: {INQ.STRATEGIES}")
        if unit not in UNITS:
            raise ConfigError(f"inq.unit={unit!r}; allowed: {UNITS}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"inq.types: {bad} unknown; allowed: {sorted(LAYER_TYPES)}")
        if boundaries is None:
            if int(start) < 0:
                raise ConfigError(f"inq.start={start}: must be >= 0")
            boundaries = [int(start) + i * int(stage_length) for i in range(len(self.schedule))]
        boundaries = [int(b) for b in boundaries]
        if len(boundaries) != len(self.schedule) or sorted(boundaries) != boundaries:
            raise ConfigError(f"inq.boundaries={boundaries}: need {len(self.schedule)} "
                              "non-decreasing stage starts (one per schedule entry)")
        self.bits, self.strategy, self.unit, self.seed = bits, strategy, unit, seed
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        self.types = tuple(LAYER_TYPES[t] for t in types)
        self.boundaries, self.reset_optimizer = boundaries, reset_optimizer
        self.stage = 0  # number of stages applied
        self.masks: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.levels: dict[str, torch.Tensor] = {}
        self._layers: dict[str, nn.Module] = {}
        self._hooked: dict[int, object] = {}
        self.fp32_metric: float | None = None  # validation metric before the first stage
        self.fp32_snapshot = FP32Snapshot("inq")

    # -- selection ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.fp32_snapshot.bind(trainer)
        self._layers = select_modules(pl_module, self.include, self.exclude, self.types, "inq")

    def validate(self, pl_module) -> None:
        """Before training (:mod:`qtrain.validation`): the layer selection (each
        include/exclude pattern must match a layer), without keeping it."""
        select_modules(pl_module, self.include, self.exclude, self.types, "inq")

    def _weights(self):
        return {n: m.weight for n, m in self._layers.items()}

    # -- stages ---------------------------------------------------------------------------
    def _now(self, trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        applied = False
        if self.stage == 0 and self._now(trainer) >= self.boundaries[0]:
            value = trainer.callback_metrics.get(f"val_{getattr(pl_module, 'metric', 'acc')}")
            self.fp32_metric = float(value) if value is not None else None
            if self._now(trainer) > 0:  # an FP32 phase happened: its weights, for the FP32 test
                self.fp32_snapshot.take(trainer, pl_module)
        while self.stage < len(self.schedule) and self._now(trainer) >= self.boundaries[self.stage]:
            with layer_report.event(trainer, self, f"stage{self.stage + 1}"):  # per-layer report
                self._apply_stage(trainer, self.stage)
            self.stage += 1
            applied = True
        if applied and self.reset_optimizer and self.stage > 1:
            trainer.strategy.setup_optimizers(trainer)
        self._hook_optimizers(trainer)

    @torch.no_grad()
    def _apply_stage(self, trainer, t: int) -> None:
        portion = self.schedule[t]
        result = None
        if trainer.global_rank == 0:
            gen = torch.Generator().manual_seed(self.seed * 1000 + t)
            masks, frozen, levels = {}, {}, {}
            for name, w in self._weights().items():
                lv = self.levels.get(name)
                lv = INQ.inq_levels(w, self.bits) if lv is None else lv
                old = self.masks.get(name, torch.zeros_like(w, dtype=torch.bool))
                new = INQ.grow_mask(w, old.to(w.device), portion, self.strategy, gen)
                q = INQ.round_to_levels(w, lv)
                prev = self.frozen.get(name, torch.zeros_like(w)).to(w.device)
                frozen[name] = torch.where(old.to(w.device), prev, torch.where(new, q, 0.0))
                masks[name], levels[name] = new, lv
            result = (masks, frozen, levels)
        result = trainer.strategy.broadcast(result, src=0)
        masks, frozen, levels = result
        for name, w in self._weights().items():
            self.masks[name] = masks[name].to(w.device)
            self.frozen[name] = frozen[name].to(w.device, w.dtype)
            self.levels[name] = levels[name].to(w.device)
        self._restore_frozen()

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        for name, w in self._weights().items():
            if name in self.masks:
                w.copy_(torch.where(self.masks[name], self.frozen[name], w))

    # -- enforcement ----------------------------------------------------------------------
    def _hook_optimizers(self, trainer) -> None:
        hook_optimizer_steps(trainer, self._hooked, self._restore_frozen)

    def on_train_start(self, trainer, pl_module) -> None:
        self._hook_optimizers(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, w in self._weights().items():
            if name in self.masks and w.grad is not None:
                w.grad.masked_fill_(self.masks[name], 0.0)

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        if self.convert_at_end:
            self.to_power_of_two_layers(pl_module)

    def to_power_of_two_layers(self, pl_module) -> None:
        """Swap every INQ layer for a fake-quant layer with a ``bits``-bit power-of-two weight
        quantizer (sharing the parameters): the evaluated model is the fully quantized one
        even if training stopped before the last stage, and its storage is counted as
        ``bits`` per weight + one exponent per layer (run summary, Huffman estimate)."""
        from qtrain.nn.convert import set_submodule
        from qtrain.nn.fake_quant import FAKE_QUANT_TYPES, is_fake_quant
        from qtrain.nn.format_quantizers import PowerOfTwoQuantizer

        for name, m in self._layers.items():
            if not is_fake_quant(m):
                new = FAKE_QUANT_TYPES[type(m)].from_float(m, PowerOfTwoQuantizer(self.bits), None)
                set_submodule(pl_module, name, new)
                self._layers[name] = new

    def frozen_fraction(self) -> float:
        tot = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / tot if tot else 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("inq_frozen_fraction", self.frozen_fraction(), sync_dist=False)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        index = {n: frozen_index(self.frozen[n], m, self.levels[n]) for n, m in self.masks.items()}
        return {"stage": self.stage, "frozen_index": cpu(index),
                "levels": cpu(self.levels), "bits": self.bits, "schedule": self.schedule,
                "fp32_metric": self.fp32_metric, SNAPSHOT_KEY: self.fp32_snapshot.ref()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("schedule", self.schedule) != self.schedule:
            raise ConfigError(f"inq: checkpoint schedule {state['schedule']} differs from the "
                              f"configured {self.schedule}")
        self.stage = int(state["stage"])
        self.fp32_metric = state.get("fp32_metric")
        self.fp32_snapshot.restore(state)
        weights = self._weights() if self._layers else {}
        dev = lambda n, v: v.to(weights[n].device) if n in weights else v  # noqa: E731
        self.levels = {n: dev(n, v) for n, v in state["levels"].items()}
        if "frozen_index" in state:
            pairs = {n: from_frozen_index(dev(n, v), self.levels[n])
                     for n, v in state["frozen_index"].items()}
            self.masks = {n: m for n, (m, _) in pairs.items()}
            self.frozen = {n: f for n, (_, f) in pairs.items()}
        else:  # written before the compact form
            self.masks = {n: dev(n, v) for n, v in state["masks"].items()}
            self.frozen = {n: dev(n, v) for n, v in state["frozen"].items()}
