"""``train(cfg)``: instantiate data, model, task module, method callbacks, loggers and trainer
from the composed Hydra config; fit; evaluate quantized and float; report sizes; export.

Every run directory holds ``.hydra/`` (config, overrides), ``config_resolved.yaml``,
``checkpoints/``, logger output and, on success only, ``summary.json``; a failed run leaves
``FAILED`` with the cause instead, a run stopped by a signal ``PREEMPTED`` / ``INTERRUPTED``
(:mod:`qtrain.cli`, :mod:`qtrain.signals`). Config that can be checked before training is
checked before training (:mod:`qtrain.validation`).
"""

from __future__ import annotations

import logging
import os
import time

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain import checkpointing, dashboard, init_weights, optional, report, terminal, validation
from qtrain.callbacks.resume_state import ResumeState
from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.signals import SignalCheckpoint

log = logging.getLogger("qtrain")


def _prepare_smoke(cfg: DictConfig) -> None:
    """Smoke mode for transformers models: write a tiny model + tokenizer of the same family."""
    m = cfg.model
    if m.get("tiny") and "name_or_path" in m:
        from qtrain.models.hf import make_tiny_pretrained

        path = os.path.join(cfg.paths.smoke_root, f"tiny_{m.family}")
        with open_dict(cfg):
            cfg.model.name_or_path = make_tiny_pretrained(m.family, path, cfg.seed)


def build_datamodule(cfg: DictConfig):
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    with open_dict(cfg):
        cfg.dataset_info.num_classes = getattr(dm, "num_classes", None)
        cfg.dataset_info.vocab_size = len(dm.vocab) if getattr(dm, "vocab", None) else None
    return dm


def build_callbacks(cfg: DictConfig) -> tuple[list[pl.Callback], pl.Callback | None]:
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    quant_cb = instantiate(cfg.quant) if cfg.get("quant") else None
    if quant_cb is not None:
        callbacks.insert(0, quant_cb)
    for c in cfg.get("extra_callbacks") or {}:
        if cfg.extra_callbacks[c] is not None:
            callbacks.append(instantiate(cfg.extra_callbacks[c]))
    if cfg.get("export"):
        from qtrain.callbacks.export_preflight import ExportPreflight

        callbacks.append(ExportPreflight())  # after the method callbacks' setup conversion
        if cfg.get("export_onnx"):
            from qtrain.callbacks.onnx_preflight import OnnxPreflight

            callbacks.append(OnnxPreflight())  # every layer has an ONNX QDQ form, pre-fit
    if cfg.get("export_hf"):
        from qtrain.callbacks.export_hf_preflight import ExportHFPreflight

        callbacks.append(ExportHFPreflight())  # every layer has a compressed-tensors form
    return callbacks, quant_cb


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]


def set_quantizers_enabled(model, flag: bool) -> list[Quantizer]:
    qs = [m for m in model.modules() if isinstance(m, Quantizer)]
    for q in qs:
        q.enabled = flag
    return qs


def _metric(results: list[dict], key: str) -> float | None:
    return float(results[0][key]) if results and key in results[0] else None


def _overrides() -> list[str] | None:
    """The run's command-line overrides (Hydra's ``overrides.task``); None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def _fits(module, state: dict | None) -> bool:
    """Every tensor of ``state`` (the float network before conversion) is still a tensor of
    ``module`` with its shape (not so after BN folding, which renames them)."""
    if state is None:
        return False
    own = module.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        log.info("FP32 test of the init_from weights skipped: %d tensors no longer in the "
                 "converted model (e.g. %s)", len(bad), bad[0])
    return not bad


def _test_snapshot(trainer, module, dm, state: dict, key: str, strict: bool = True) -> float | None:
    """Test metric of ``module`` with ``state`` loaded and quantizers off; restores after.
    ``strict=False``: ``state`` is the float network before conversion (quantizer tensors
    absent; they are unused with the quantizers off)."""
    current = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state, strict=strict)
    set_quantizers_enabled(module.model, False)
    try:
        return _metric(trainer.test(module, datamodule=dm, verbose=False), key)
    finally:
        module.load_state_dict(current)
        set_quantizers_enabled(module.model, True)


def export_packed(model, run_dir: str, run: dict | None = None) -> dict:
    """Pack the trained quantized layers (qtrain.export) and write them with every other
    tensor (BatchNorm statistics included) to ``<run dir>/model_packed.safetensors``;
    ``run`` (qtrain.export.run_info: recipe, method, bits) goes into its metadata."""
    from qtrain.export import pack_model, save_packed

    path = os.path.join(run_dir, "model_packed.safetensors")
    info = save_packed(pack_model(model.eval()), path, run)
    log.info("packed model: %s (%d bytes, %d packed layers)", path, info["file_bytes"],
             info["n_packed_layers"])
    return {"packed_file": path, "packed_mb": info["file_bytes"] / 1e6,
            "packed_layers": info["n_packed_layers"]}


def train(cfg: DictConfig) -> dict:
    t0 = time.time()
    run_dir = cfg.paths.output_dir
    os.makedirs(run_dir, exist_ok=True)
    for stale in ("FAILED", "summary.json"):  # a rerun into the same directory
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    validation.check_config(cfg)
    if cfg.get("export_onnx") and not cfg.get("export"):
        raise ConfigError("export_onnx=true needs export=true (the ONNX file is written from "
                          "the packed model)")
    optional.check_config(cfg)  # every optional package the config needs is installed
    # ckpt_path=last | <run dir> | <file>; verified (checksum, recipe, bits) before building
    ckpt_path = checkpointing.resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    ckpt_io = checkpointing.VerifiedCheckpointIO(checkpointing.run_metadata(cfg))
    if ckpt_path and cfg.fit:
        ckpt_io.preload(ckpt_path)
    # init_from=<float run>: its weights, loaded before the method converts the layers
    init_loaded = init_weights.read(cfg.get("init_from"))
    pl.seed_everything(cfg.seed, workers=True)
    _prepare_smoke(cfg)
    dm = build_datamodule(cfg)
    model = instantiate(cfg.model)
    init_info = init_weights.initialise(model, cfg.get("init_from"), init_loaded)
    fp32_bits = report.model_bits(model)
    module = instantiate(cfg.task, model=model)
    # the starting network's own test metric is the run's FP32 number when the method
    # quantizes from the first step (no FP32 phase): the tensors init_from read (load_into
    # copied them into the model, so they are still the starting weights) are that snapshot
    init_snapshot = ({init_weights.PREFIX + k: v for k, v in init_loaded[0].items()}
                     if init_loaded is not None else None)
    callbacks, quant_cb = build_callbacks(cfg)
    validation.check_callbacks(module, callbacks)  # every quantizer vs every layer, pre-fit
    callbacks.append(SignalCheckpoint(os.path.join(run_dir, "checkpoints")))  # qtrain.signals
    callbacks.append(ResumeState())  # RNG states + logged metrics in every checkpoint
    loggers = build_loggers(cfg)
    with open(os.path.join(run_dir, "config_resolved.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_io.config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    bar = terminal.add_progress_bar(cfg, callbacks)  # a Rich bar on a terminal, none in logs
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          default_root_dir=run_dir, plugins=[ckpt_io], enable_progress_bar=bar)
    dashboard.log_config(trainer.loggers, cfg)
    if cfg.fit:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    key = f"test_{module.metric}"
    val = trainer.callback_metrics.get(f"val_{module.metric}") if cfg.fit else None
    quant_val_metric = float(val) if val is not None else None
    quant_metric = _metric(trainer.test(module, datamodule=dm, verbose=False), key)
    fp32_val_metric = getattr(quant_cb, "fp32_metric", None)  # validation before quantizing
    fp32_metric = None
    float_metric = None
    qs = set_quantizers_enabled(module.model, False)
    if qs:  # the float master weights, evaluated without quantization
        float_metric = _metric(trainer.test(module, datamodule=dm, verbose=False), key)
        set_quantizers_enabled(module.model, True)
    fp32_source = None
    if quant_cb is None:
        fp32_metric, fp32_source = quant_metric, "this run (no quantization)"
    elif fp32_val_metric is None and _fits(module, init_snapshot):  # quantized from the start
        fp32_metric = _test_snapshot(trainer, module, dm, init_snapshot, key, strict=False)
        fp32_source = "init_from weights"
    elif fp32_val_metric is None:  # quantized from the start (or PTQ): same weights in float
        fp32_metric, fp32_source = float_metric, "float master weights (no FP32 phase)"
    elif getattr(quant_cb, "fp32_state", None) is not None:  # the FP32 phase's final weights
        fp32_metric = _test_snapshot(trainer, module, dm, quant_cb.fp32_state, key)
        fp32_source = "FP32 phase's last weights"
    quant_bits = report.model_bits(module.model)
    summary = {
        "recipe": cfg.get("recipe_name") or OmegaConf.select(cfg, "hydra_recipe", default=None),
        "metric": module.metric,
        "fp32_metric": fp32_metric,
        "fp32_source": fp32_source,  # which weights fp32_metric tested
        "fp32_val_metric": fp32_val_metric,
        "quant_val_metric": quant_val_metric if quant_cb is not None else None,
        "float_weights_metric": float_metric,
        "quant_metric": quant_metric if quant_cb is not None else None,
        "int_metric": getattr(quant_cb, "int_metric", None),  # integer-only model (intqat)
        "int_ref_metric": getattr(quant_cb, "int_ref_metric", None),
        "effective_bits": getattr(quant_cb, "effective_bits", None),  # Merolla 2016 (merolla)
        "fp32_mb": fp32_bits / 8 / 1e6,
        "quant_mb": quant_bits / 8 / 1e6,
        "compression": fp32_bits / quant_bits,
        "huffman_mb": report.huffman_bits(module.model) / 8 / 1e6,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "run_dir": os.path.abspath(run_dir),
        "smoke": bool(OmegaConf.select(cfg, "data.fake", default=False)),
        "init_from": init_info,  # file, checksum, recipe and step of the starting weights
        "overrides": _overrides(),  # qtrain.sweep_summary / qtrain.compare label runs by them
    }
    summary["time_s"] = time.time() - t0
    if trainer.is_global_zero:
        report.write_summary(summary, run_dir)  # kept even if the export below fails
        if cfg.get("export"):
            from qtrain.export import run_info

            summary.update(export_packed(module.model, run_dir, run_info(cfg)))
            if cfg.get("export_onnx"):  # <run dir>/model.onnx from the packed file
                from qtrain.export_onnx import export_run

                summary.update(export_run(run_dir, dm, module, run_info(cfg)))
            report.write_summary(summary, run_dir)
        if cfg.get("export_hf"):  # <run dir>/hf_model/: transformers loads it without qtrain
            from qtrain.export import run_info
            from qtrain.export_hf import export_run as export_hf_run

            summary.update(export_hf_run(run_dir, dm, module, run_info(cfg)))
            report.write_summary(summary, run_dir)
        dashboard.log_final(trainer.loggers, summary, trainer.global_step)
        terminal.print_run_end(summary, trainer, cfg)  # rich tables on a terminal, else text
    return summary
