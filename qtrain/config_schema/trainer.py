"""Schema of the ``trainer`` group (conf/trainer/*.yaml): every ``pytorch_lightning.Trainer``
argument (tests/test_config_schema.py compares the keys and the enums with the installed
Lightning), so a misspelled ``+trainer.<key>`` or an unknown precision fails before torch is
imported. ``trainer.max_epochs`` / ``max_steps`` ranges are :func:`qtrain.validation.
check_config`'s (its messages say what 0 and -1 mean)."""

from __future__ import annotations

from typing import Any, Literal

from qtrain.config_schema.core import Float, Int, Node, opt, schema

ACCELERATORS = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
PRECISIONS = Literal[64, 32, 16, "transformer-engine", "transformer-engine-float16", "16-true",
                     "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32",
                     "16", "bf16"]
LIMIT = Int(ge=0) | Float(ge=0, le=1) | None  # N batches, or a fraction of the epoch


@schema("pytorch_lightning.Trainer", yaml="conf/trainer/*.yaml")
class Trainer:
    accelerator: ACCELERATORS = opt()
    strategy: str | Node = opt()  # a registry name (ddp, fsdp, ...: open) or a Strategy node
    devices: Int(ge=-1) | str | list[Int(ge=0)] = opt()
    num_nodes: Int(ge=1) = opt()
    precision: PRECISIONS | None = opt()
    logger: Any = opt()
    callbacks: Any = opt()
    fast_dev_run: Int(ge=0) | bool = opt()
    max_epochs: int | None = opt()
    min_epochs: Int(ge=0) | None = opt()
    max_steps: int = opt()
    min_steps: Int(ge=0) | None = opt()
    max_time: str | dict[str, int] | None = opt()
    limit_train_batches: LIMIT = opt()
    limit_val_batches: LIMIT = opt()
    limit_test_batches: LIMIT = opt()
    limit_predict_batches: LIMIT = opt()
    overfit_batches: Int(ge=0) | Float(ge=0, le=1) = opt()
    val_check_interval: Int(ge=1) | Float(gt=0, le=1) | str | dict[str, int] | None = opt()
    check_val_every_n_epoch: Int(ge=1) | None = opt()
    num_sanity_val_steps: Int(ge=-1) | None = opt()
    log_every_n_steps: Int(ge=0) | None = opt()
    enable_checkpointing: bool | None = opt()
    enable_progress_bar: bool | None = opt()
    enable_model_summary: bool | None = opt()
    accumulate_grad_batches: Int(ge=1) = opt()
    gradient_clip_val: Float(ge=0) | None = opt()
    gradient_clip_algorithm: Literal["value", "norm"] | None = opt()
    deterministic: bool | Literal["warn"] | None = opt()
    benchmark: bool | None = opt()
    inference_mode: bool = opt()
    use_distributed_sampler: bool = opt()
    profiler: Literal["simple", "advanced", "pytorch", "xla"] | None = opt()
    detect_anomaly: bool = opt()
    barebones: bool = opt()
    plugins: Any = opt()
    sync_batchnorm: bool = opt()
    reload_dataloaders_every_n_epochs: Int(ge=0) = opt()
    default_root_dir: str | None = opt()
    enable_autolog_hparams: bool = opt()
    model_registry: str | None = opt()
