"""Everything that can be checked before training is checked before training.

:mod:`qtrain.cli` calls :func:`check_config` before it imports torch, and ``train`` again
first (trainer settings that would train nothing or that Lightning would reject with a
message naming no key, then every value against :mod:`qtrain.config_schema`: types,
ranges, enums, bit widths vs the quantizer classes), and :func:`check_callbacks` right after
the model and the callbacks are built, before ``trainer.fit``: every callback with a
``validate(pl_module)`` method checks its arguments against the layers it will convert
(e.g. a Q-BERT group split against every selected layer's rows), so a bad setting fails in
seconds, naming the layer and the key, instead of after the FP32 phase.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qtrain import config_schema
from qtrain.errors import ConfigError


def _int_or_none(cfg: DictConfig, key: str):
    v = OmegaConf.select(cfg, key, default=None)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{key}={v!r}: allowed: an integer >= -1 (-1: no limit) or null")
    return v


def check_config(cfg: DictConfig) -> None:
    """Config values checked before any data, model or trainer is built (no torch needed)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing values (set them on the command line): {', '.join(missing)}")
    epochs = _int_or_none(cfg, "trainer.max_epochs")
    steps = _int_or_none(cfg, "trainer.max_steps")
    for key, v in (("trainer.max_epochs", epochs), ("trainer.max_steps", steps)):
        if v is not None and v < -1:
            raise ConfigError(f"{key}={v}: allowed: a positive integer, or -1 (no limit)")
    if cfg.get("fit", True):
        if epochs == 0 or steps == 0:
            key = "trainer.max_epochs" if epochs == 0 else "trainer.max_steps"
            raise ConfigError(f"{key}=0 trains nothing: the summary would describe an untrained "
                              "model; use a positive value, or fit=false to only evaluate")
    config_schema.check(cfg)


def check_callbacks(pl_module, callbacks) -> None:
    """Each callback's optional ``validate(pl_module)``: raises ConfigError naming the key
    and the layer. Called once the model is built and before ``trainer.fit``; it must not
    change the model or the callback's state."""
    for cb in callbacks:
        validate = getattr(cb, "validate", None)
        if callable(validate):
            validate(pl_module)
