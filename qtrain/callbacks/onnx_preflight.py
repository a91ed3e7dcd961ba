"""Fail fast on ``export_onnx=true`` runs with layers the ONNX QDQ export cannot represent.

``python train.py ... export=true export_onnx=true`` writes ``model.onnx`` from the packed
model at the end of the run (:mod:`qtrain.export_onnx`). The quantization callbacks convert
the layers in ``setup``, so this callback checks them in ``on_fit_start`` -- after the
conversion, before the first step, right after :class:`ExportPreflight`'s packed-format check
-- and raises the one error (every layer, what ONNX supports) the export would raise after
training (:func:`qtrain.export_onnx.preflight`).
"""

from __future__ import annotations

import pytorch_lightning as pl

from qtrain.export_onnx import preflight


class OnnxPreflight(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        preflight(getattr(pl_module, "model", pl_module))
