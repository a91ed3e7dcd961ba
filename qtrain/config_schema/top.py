"""Schema of the top-level keys of conf/train.yaml.

The group nodes (``data``, ``trainer``, ``quant``, ``extra_callbacks.<name>``, ``terminal``)
are checked by their ``_target_``'s schema; ``model``, ``task``, ``optimizer``, ``scheduler``,
``logger`` and ``callbacks`` are left to their classes. Other top-level keys are not errors at run time
(a recipe may keep its own variables there, e.g. ``fixed_point_fl``; Hydra already rejects a
misspelled key from the command line); tests/test_config_schema.py requires every key of
conf/train.yaml to be declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtrain.config_schema.core import Int, Node, opt


@dataclass
class Top:
    seed: Int(ge=0, le=2**32 - 1) = opt()
    quant_start_epoch: Int(ge=0) = opt()
    fit: bool = opt()
    export: bool = opt()
    export_onnx: bool = opt()
    export_hf: bool = opt()
    ckpt_path: str | None = opt()
    init_from: str | None = opt()
    recipe_name: str | None = opt()
    quant: Node | None = opt()
    data: Node = opt()
    trainer: Node = opt()
    extra_callbacks: dict[str, Any] | None = opt()
    terminal: Node = opt()  # qtrain.terminal.Terminal (config_schema/terminal.py)
    # left to their own classes (no schema here yet)
    model: Any = opt()
    task: Any = opt()
    optimizer: Any = opt()
    scheduler: Any = opt()
    logger: Any = opt()
    callbacks: Any = opt()
    dataset_info: Any = opt()
    paths: Any = opt()
