"""Per-layer report and weight histograms at every quantization event (issue 13, items 2-3).

Events: ``start`` (``on_train_start``: after the method callbacks -- listed before this one
-- converted their layers; quantizers that a float phase keeps disabled are evaluated
enabled), every stage a method announces through :func:`qtrain.layer_report.event` /
:func:`~qtrain.layer_report.notify` (INQ ``inq_stage<t>``, iPQ ``iterativepq_stage<t>``,
Deep Compression ``deepcompression_prune<i>`` / ``_quantize`` / ``_finalize``, HAWQ / Q-BERT
``hessiansensitivity_bits`` with the per-layer ``curvature`` and ``sensitivity`` columns; an
event that changed no layer and brought no column is not reported), and ``end`` (``on_fit_end``: after the methods' end-of-fit
conversions). A model without quantized layers writes nothing.

Per event, on global rank 0, in the run directory (``trainer.default_root_dir``):
``layer_report_<event>.csv`` (``layer_report.csv`` for ``end``; columns in
:mod:`qtrain.layer_report`), ``layer_report_<event>.png`` (bit map: bits per weight and
relative error per layer) and ``weight_histograms_<event>.png`` (float W and Q(W)
overlaid, :mod:`qtrain.weight_histograms`). Loggers: wandb (a ``WandbLogger``) gets the
table (``layer_report/<event>``), both images and ``wandb.Histogram`` s of the sampled
float / quantized weights; TensorBoard gets the table as text, per-layer scalars
``layer_report/{bits_per_weight,rel_error}/<layer>``, both figures and histograms
``weights/<layer>/{float,quantized}`` (the quantized one binned between its levels, so every
level is its own bucket); the CSV logger only the file.

Cost is bounded: one quantizer evaluation per quantized layer per event, histograms for at
most ``hist_max_layers`` layers of at most ``hist_max_weights`` sampled weights each, drawn
with a private generator (the run's random streams are untouched). Resumed runs: the
pre-event float weights are not checkpointed, so PQ layers quantized before the resume
report a NaN error (``reference`` says so); method-provided columns are kept.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from qtrain import layer_report as LR
from qtrain import weight_histograms as WH
from qtrain.errors import ConfigError

log = logging.getLogger("qtrain")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "event"


def level_edges(levels: np.ndarray) -> np.ndarray:
    """Histogram bin edges with every level alone in its bin (midpoints between levels)."""
    lv = np.unique(levels.astype(np.float64))
    if len(lv) == 1:
        return np.array([lv[0] - 0.5, lv[0] + 0.5])
    mid = (lv[1:] + lv[:-1]) / 2
    return np.concatenate([[lv[0] - (mid[0] - lv[0])], mid, [lv[-1] + (lv[-1] - mid[-1])]])


def png_summary(writer, tag: str, png: bytes):
    """A TensorBoard image summary holding the encoded ``png`` as it is (``add_figure`` /
    ``add_image`` would draw the figure again and re-encode it). ``writer``: the logger's
    ``SummaryWriter`` (torch's or tensorboardX's; the matching protobuf classes)."""
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.proto.summary_pb2 import Summary
    else:
        from tensorboard.compat.proto.summary_pb2 import Summary
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{tag}: not a PNG")
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(png[25], 4)  # PNG colour type -> channels
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png))])


class LayerReportCallback(pl.Callback):
    """Args:
        enabled: off = no report at all (no files, no logging, no cost).
        at_start / at_end / at_stages: which events are reported.
        histograms: draw / log weight histograms; hist_max_layers: at most this many layers
            (evenly spaced); hist_max_weights: sampled weights per layer; hist_bins: bins of
            the float histogram in the PNG; seed: of the private sampling generator.
        png: write the bit-map and histogram PNGs (and log them as images).
    """

    def __init__(self, enabled: bool = True, at_start: bool = True, at_end: bool = True,
                 at_stages: bool = True, histograms: bool = True, hist_max_layers: int = 8,
                 hist_max_weights: int = 4096, hist_bins: int = 80, seed: int = 0,
                 png: bool = True) -> None:
        super().__init__()
        for key, v in (("hist_max_layers", hist_max_layers),
                       ("hist_max_weights", hist_max_weights), ("hist_bins", hist_bins)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key ==
                                                                      "hist_max_layers" else 1):
                raise ConfigError(f"callbacks.layer_report.{key}={v!r}; allowed: an int >= "
                                  f"{0 if key == 'hist_max_layers' else 1}")
        self.enabled, self.at_start, self.at_end = bool(enabled), bool(at_start), bool(at_end)
        self.at_stages, self.histograms, self.png = bool(at_stages), bool(histograms), bool(png)
        self.hist_max_layers, self.hist_max_weights = hist_max_layers, hist_max_weights
        self.hist_bins, self.seed = hist_bins, int(seed)
        self.in_place: dict[str, LR.InPlace] = {}
        self.extra: dict[str, dict] = {}
        self.reports: dict[str, list[dict]] = {}  # event -> rows (latest run of this object)
        self.files: dict[str, list[str]] = {}
        self.seconds = self.cpu_seconds = 0.0  # wall / process CPU time spent in reports

    # -- events ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self.report(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.report(trainer, pl_module, "end")

    def on_quantization_event(self, trainer, source, event_name: str, reference: dict,
                              columns: dict) -> None:
        """Called by :func:`qtrain.layer_report.notify`: register the layers the event
        quantized (replaced by a PQ / RQ / fake-quant layer, or weight rewritten) with their
        pre-event float weight, keep the extra columns, and report."""
        if not self.enabled:
            return
        model = trainer.lightning_module
        src = LR.source_name(source)
        bits = getattr(source, "bits", None)
        bits = bits if isinstance(bits, int) and not isinstance(bits, bool) else None
        event = f"{src.lower()}_{event_name}"
        mods, changed = dict(model.named_modules()), 0
        for name, ref in reference.items():
            m = mods.get(name)
            w = None if m is None else m._parameters.get("weight")
            replaced = m is not None and (LR.is_pq(m) or LR.is_rq(m))
            rewritten = isinstance(w, torch.Tensor) and not torch.equal(
                ref, w.detach().to("cpu"))
            if replaced or rewritten:
                self.in_place[name] = LR.InPlace(ref, src, event, bits)
                changed += 1
        for col, vals in columns.items():
            self.extra.setdefault(col, {}).update(vals or {})
        if self.at_stages and (changed or columns):  # an event that changed nothing: no report
            self.report(trainer, model, event)

    # -- report ---------------------------------------------------------------------------
    def report(self, trainer, pl_module, event: str) -> LR.Report | None:
        if not self.enabled or not trainer.is_global_zero:
            return None
        t0, c0 = time.perf_counter(), time.process_time()
        model = pl_module
        names = LR.quantized_layer_names(model, self.in_place)
        if not names:
            return None
        keep = WH.choose_layers(names, self.hist_max_layers) if self.histograms else []
        rep = LR.layer_report(model, self.in_place, self.extra, keep=keep)
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = _safe(event)
        suffix = "" if event == "end" else f"_{tag}"
        csv_path = out / f"layer_report{suffix}.csv"
        LR.write_csv(rep, csv_path)
        files, figs = [str(csv_path)], {}
        title = f"{event} (step {trainer.global_step}, epoch {trainer.current_epoch})"
        from qtrain.optional import available

        if self.png and not available("matplotlib"):  # core install: CSV + loggers, no PNG
            log.info('layer report: no PNGs (they need matplotlib: pip install "qtrain[plots]")')
            self.png = False
        if self.png:
            p = out / f"layer_report{suffix}.png"
            LR.plot_png(rep, p, f"per-layer report: {title}")
            figs["layer_report"] = p
            files.append(str(p))
        samples = [WH.sample(n, lw.w, lw.q, self.hist_max_weights, self.seed)
                   for n, lw in rep.weights.items()]
        if samples and self.png:
            p = out / f"weight_histograms{suffix}.png"
            WH.plot_png(samples, p, f"weights: {title}", self.hist_bins)
            figs["weight_histograms"] = p
            files.append(str(p))
        self._log(trainer, event, rep, figs, samples)
        self.reports[event], self.files[event] = rep.rows, files
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.seconds += dt
        self.cpu_seconds += dc
        log.info("layer report %s: %d layers, %.2f s (%.2f s CPU) -> %s", event, len(rep.rows),
                 dt, dc, csv_path)
        return rep

    # -- loggers --------------------------------------------------------------------------
    def _log(self, trainer, event, rep: LR.Report, figs: dict, samples) -> None:
        step = trainer.global_step
        cols = rep.columns
        for lg in trainer.loggers:
            kind = type(lg).__name__
            if kind == "WandbLogger":
                self._log_wandb(lg, event, rep, cols, figs, samples, step)
                continue
            exp = getattr(lg, "experiment", None)
            if not callable(getattr(exp, "add_histogram", None)):
                continue  # CSV logger & co.: the CSV file in the run dir is the record
            exp.add_text(f"layer_report/{event}", LR.markdown(rep), step)
            for r in rep.rows:
                for key in ("bits_per_weight", "rel_error"):
                    v = r.get(key)
                    if v is not None and math.isfinite(v):
                        exp.add_scalar(f"layer_report/{key}/{r['layer']}", float(v), step)
            for name, path in figs.items():  # the PNG written above, not drawn again
                exp._get_file_writer().add_summary(png_summary(exp, f"{name}/{event}",
                                                               Path(path).read_bytes()), step)
            for s in samples:
                if s.float_values is not None:
                    exp.add_histogram(f"weights/{s.layer}/float", s.float_values, step)
                bins = (level_edges(s.quant_values) if len(s.levels) <= WH.MAX_LEVEL_BARS
                        else "tensorflow")
                exp.add_histogram(f"weights/{s.layer}/quantized", s.quant_values, step,
                                  bins=bins)
            exp.flush()

    @staticmethod
    def _log_wandb(lg, event, rep, cols, figs, samples, step) -> None:
        import wandb

        data = [[None if isinstance(v, float) and not math.isfinite(v) else v
                 for v in (r.get(c) for c in cols)] for r in rep.rows]
        lg.log_table(key=f"layer_report/{event}", columns=cols, data=data, step=step)
        for name, path in figs.items():
            lg.log_image(key=f"{name}/{event}", images=[str(path)], step=step)
        hist = {}
        for s in samples:
            if s.float_values is not None:
                hist[f"weights/{s.layer}/float"] = wandb.Histogram(s.float_values)
            hist[f"weights/{s.layer}/quantized"] = wandb.Histogram(
                np_histogram=np.histogram(s.quant_values, bins=level_edges(s.quant_values))
                if len(s.levels) <= WH.MAX_LEVEL_BARS else None,
                sequence=None if len(s.levels) <= WH.MAX_LEVEL_BARS else s.quant_values)
        if hist:
            lg.log_metrics(hist, step=step)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"extra": {k: dict(v) for k, v in self.extra.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.extra = {k: dict(v) for k, v in (state.get("extra") or {}).items()}
