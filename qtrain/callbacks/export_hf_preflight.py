"""Fail fast on ``export_hf=true`` runs whose quantized model has no compressed-tensors form.

The method callbacks convert the layers in ``setup``; this callback checks the converted
model in ``on_fit_start`` (:func:`qtrain.export_hf.preflight`: activation quantizers,
non-uniform weight formats, convolutions, ... every layer named at once) and raises the same
error the export at the end of the run would raise.
"""

from __future__ import annotations

import pytorch_lightning as pl

from qtrain.export_hf import preflight


class ExportHFPreflight(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        preflight(getattr(pl_module, "model", pl_module))
