"""What a packed file records besides the tensors: each packed layer's spec (format, sizes,
what it was packed from, its activation quantizer -- rebuilt on load for the quantizers of
:data:`ACT_QUANTIZERS`) and the run's configuration (:func:`run_info`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from torch import nn

from qtrain.nn.abc_quantizer import ABCActQuantizer
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.format_quantizers import BinaryActQuantizer, DynamicFixedPointQuantizer
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from qtrain.nn.learned_quantizers import (
    DoReFaActQuantizer,
    DSQQuantizer,
    LSQQuantizer,
    PACTQuantizer,
)
from qtrain.nn.packed import PackedLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer


def _calibrated_kwargs(aq: CalibratedQuantizer) -> dict:
    """Constructor arguments of a calibrated (PTQ) quantizer: its observer by calibration name
    (:func:`qtrain.nn.observers.make_observer`) with that observer's own arguments."""
    ob = aq.observer
    kind = type(ob).__name__
    if kind == "MinMaxObserver":
        extra = ({"calibration": "minmax"} if ob.momentum is None
                 else {"calibration": "ema", "momentum": ob.momentum})
    elif kind == "HistogramObserver":
        extra = {"calibration": ob.method, "bins": ob.bins, "percentile": ob.percentile,
                 "kl_start": ob.kl_start}
    elif kind == "ACIQObserver":
        extra = {"calibration": f"aciq-{ob.distribution}"}
    else:
        raise TypeError(f"CalibratedQuantizer with observer {kind}: no rebuild recipe")
    return {"bits": aq.bits, "symmetric": aq.symmetric, "name": ob.name, **extra}


# Activation quantizers a packed file can rebuild by itself (an allow-list: nothing else is
# constructed from file metadata): class -> the constructor arguments read back from the
# trained quantizer's attributes (or a function returning them). Their learned tensors -- PACT's alpha, LSQ's step, DSQ's
# l / u / alpha, the EMA ranges of UniformQuantizer, ``initialized`` flags -- are submodule
# tensors of the packed layer, so they travel in the file and are loaded back exactly.


ACT_QUANTIZERS: dict[str, tuple[type, tuple[str, ...] | Callable]] = {c.__name__: (c, a) for c, a in (
    (UniformQuantizer, ("bits", "symmetric", "granularity", "group_size", "axis", "observer",
                        "ema_decay")),
    (PACTQuantizer, ("bits", "l2_decay")),
    (LSQQuantizer, ("bits", "signed", "role")),
    (DSQQuantizer, ("bits", "hard", "hard_threshold", "ste_forward")),
    (DoReFaActQuantizer, ("bits", "grad_bits", "per_sample", "seed")),
    (BinaryActQuantizer, ("bits",)),
    (ABCActQuantizer, ("bits", "ste_gain")),  # v / beta: tensors in the file
    (DynamicFixedPointQuantizer, ("bits", "rounding", "seed")),
    (FP8TrainingQuantizer, ("bits", "fmt", "grad_fmt", "saturate", "grad_saturate",
                            "rounding", "grad_rounding", "seed", "accumulation", "chunk_size",
                            "acc_dtype")),
    (ValueAwareQuantizer, ("bits", "ratio", "symmetric", "name")),
    (CalibratedQuantizer, _calibrated_kwargs),
)}


def _act_spec(aq: nn.Module | None) -> dict | None:
    if aq is None:
        return None
    entry = ACT_QUANTIZERS.get(type(aq).__name__)
    if entry is None or type(aq) is not entry[0]:
        return {"type": type(aq).__name__}  # rebuilt only from the model passed to load_packed
    try:
        kwargs = entry[1](aq) if callable(entry[1]) else {a: getattr(aq, a) for a in entry[1]}
        json.dumps(kwargs)  # plain values only
    except TypeError:
        return {"type": type(aq).__name__}  # rebuilt only from the model passed to load_packed
    return {"type": type(aq).__name__, "kwargs": kwargs, "enabled": bool(aq.enabled)}


def packed_specs(model: nn.Module) -> dict:
    return {n: {**m.spec(), "act_quantizer": _act_spec(m.act_quantizer)}
            for n, m in model.named_modules() if isinstance(m, PackedLinear)}


RUN_KEYS = ("recipe", "method", "bits", "act_bits")


def run_info(cfg) -> dict:
    """The configuration a packed file records (and :func:`load_run` compares): the recipe,
    the quantization method (``quant._target_``) and its weight / activation bit widths."""
    from omegaconf import OmegaConf

    def get(key):
        v = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v

    return {"recipe": get("recipe_name") or get("hydra_recipe"), "method": get("quant._target_"),
            "bits": get("quant.bits"), "act_bits": get("quant.act_bits")}
