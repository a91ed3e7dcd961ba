"""Fail fast on ``export=true`` runs whose quantizers have no packed format.

``python train.py ... export=true`` packs the trained model at the end of the run
(:func:`qtrain.export.pack_model`). Quantizers are created by the method callbacks in
``setup``, so this callback checks them in ``on_fit_start`` -- after the conversion, before
the first step -- and raises the same clear error the export would raise hours later.
"""

from __future__ import annotations

import pytorch_lightning as pl

from qtrain.export import check_packable


class ExportPreflight(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        check_packable(getattr(pl_module, "model", pl_module))
