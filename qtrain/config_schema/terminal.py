"""Schema of the ``terminal`` node of conf/train.yaml (:class:`qtrain.terminal.Terminal`)."""

from __future__ import annotations

from qtrain.config_schema.core import Int, opt, schema


@schema("qtrain.terminal.Terminal", yaml="conf/train.yaml")
class Terminal:
    layer_table_max_rows: Int(ge=0) = opt()
    progress_refresh_rate: Int(ge=1) = opt()
    progress_leave: bool = opt()
