"""What every logger (CSV, TensorBoard, wandb) gets at the end of a run: the resolved config as
hyper-parameters and the final numbers under distinct names, so a dashboard's ``test/acc_quant``
is the quantized model -- not whichever of the three final evaluations logged ``test_acc``
last (they all did, at the same step).

Names (``<m>`` is the task metric, e.g. ``acc`` or ``ppl``): ``test/<m>_quant`` (quantized
model), ``test/<m>_float_master`` (the trained float weights without quantizers),
``test/<m>_fp32`` (the FP32 phase's weights), ``val/<m>_fp32`` / ``val/<m>_quant``, and
``size/fp32_mb``, ``size/quant_mb``, ``size/packed_mb`` (with ``export=true``),
``size/compression``, ``size/huffman_mb``. wandb also gets them as its run summary.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

SUMMARY_KEYS = {  # summary.json key -> logged name (``{m}``: the task metric)
    "quant_metric": "test/{m}_quant",
    "int_metric": "test/{m}_int",  # the integer-only model (quant.integer_eval)
    "float_weights_metric": "test/{m}_float_master",
    "fp32_metric": "test/{m}_fp32",
    "fp32_val_metric": "val/{m}_fp32",
    "quant_val_metric": "val/{m}_quant",
    "fp32_mb": "size/fp32_mb",
    "quant_mb": "size/quant_mb",
    "packed_mb": "size/packed_mb",
    "compression": "size/compression",
    "huffman_mb": "size/huffman_mb",
    "effective_bits": "quant/effective_bits",  # bits per distorted weight (quant=merolla)
}


def final_metrics(summary: dict) -> dict[str, float]:
    """The run summary's numbers under their logged names (absent / None values left out)."""
    m = summary.get("metric") or "metric"
    return {name.format(m=m): float(summary[key]) for key, name in SUMMARY_KEYS.items()
            if summary.get(key) is not None}


def log_config(loggers, cfg: DictConfig) -> None:
    """The resolved config as every logger's hyper-parameters (wandb config, TensorBoard and
    CSV ``hparams.yaml``)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(params)


def log_final(loggers, summary: dict, step: int) -> dict[str, float]:
    """Log :func:`final_metrics` to every logger at ``step`` and flush; wandb run summary too."""
    metrics = final_metrics(summary)
    for lg in loggers:
        lg.log_metrics(metrics, step=step)
        run = getattr(lg, "experiment", None) if type(lg).__name__ == "WandbLogger" else None
        if run is not None:
            run.summary.update(metrics)
        lg.save()
    return metrics
