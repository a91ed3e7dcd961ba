"""Per-layer quantization report: one row per quantized layer (issue 13, item 2). Pure: no
logger, no Lightning import; :mod:`qtrain.callbacks.layer_report` writes and logs it.

Columns of a row (:data:`COLUMNS`, then any extra per-layer columns a method reported):

* ``layer``, ``method`` (the weight quantizer's class for a fake-quant layer, the layer class
  for a PQ / RQ layer, ``<Callback> (in place)`` for a plain layer whose weight a method
  rewrote), ``format`` (the quantizer's settings: granularity, symmetry, K, block size, ...),
  ``bits`` (code bits; empty for codebooks), ``n_centroids`` / ``block_size`` (codebooks).
* ``params``: number of weight elements; ``storage_bits``: the layer's row of
  :func:`qtrain.quant.size.model_storage_bits` (the run summary's accounting: codes + scales /
  codebooks + bias + activation-quantizer state; a tied layer counts only what it adds);
  ``bits_per_weight = storage_bits / params``. A layer rewritten in place (INQ, Deep
  Compression before their end-of-fit conversion) is counted there as the plain float layer
  it still is.
* ``rel_error`` = ||Q(W) - W||_F / ||W||_F. Q(W) is the weight the quantized model computes
  with: the weight quantizer applied to the master weight (a *copy* of the quantizer, in eval
  mode, enabled, under ``no_grad`` and a forked RNG, so no observer, initialisation, step
  counter or random stream of the run changes; a quantizer with ``quantized_value`` --
  Quant-Noise's phi(W), Fan et al. 2020 eq. 2 -- gives the fully quantized weight), the
  codebook reconstruction of a PQ / RQ layer, or the current weight of a layer rewritten in
  place. W is the float weight captured right before the last event that quantized the
  layer (:func:`event`: a stage of INQ / iPQ / Deep Compression; it stays the reference after
  the method's end-of-fit conversion to a fake-quant layer, whose master weight *is* the
  quantized one), else the float master weight of a fake-quant layer; a PQ / RQ layer
  without one (e.g. after a resume) has a NaN error. ``reference`` says which W was used.
* ``levels``: distinct values of Q(W) (on at most :data:`MAX_LEVEL_ELEMENTS` evenly strided
  elements) -- 2^b or fewer for a b-bit per-tensor grid, a quick check that a layer is
  quantized at all.

Quantization events: a method callback wraps the code that quantizes (a stage of INQ / iPQ /
Deep Compression) in ``with qtrain.layer_report.event(trainer, self, "stage1"):``; on exit
every callback of the trainer with an ``on_quantization_event`` method (the layer-report
callback) is told, with the float weights captured on entry. :func:`notify` passes extra
per-layer columns (e.g. HAWQ's ``sensitivity``). Neither costs anything when no such
callback is attached.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from qtrain.nn.fake_quant import is_fake_quant
from qtrain.nn.pq_layers import is_pq
from qtrain.nn.rq_layers import is_rq
from qtrain.quant.size import model_storage_bits

HOOK = "on_quantization_event"
COLUMNS = ("layer", "method", "format", "bits", "n_centroids", "block_size", "params",
           "storage_bits", "bits_per_weight", "rel_error", "levels", "reference")
MAX_LEVEL_ELEMENTS = 1 << 16
_FLOAT_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)
_FORMAT_ATTRS = ("granularity", "symmetric", "group_size", "axis", "mode", "block_size",
                 "bucket_size", "n_centroids", "fmt", "exp_bits", "man_bits")


# ---------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------

def listeners(trainer) -> list:
    """Callbacks of ``trainer`` that take quantization events (``on_quantization_event``)."""
    return [cb for cb in (getattr(trainer, "callbacks", None) or [])
            if callable(getattr(cb, HOOK, None))]


def notify(trainer, source, event_name: str, reference: dict | None = None,
           **columns: dict) -> None:
    """Tell the listeners that ``source`` (the calling callback) quantized at ``event_name``.

    ``reference``: {layer: float weight before the event}; ``columns``: extra per-layer
    columns, each {layer: value} (e.g. ``sensitivity=...``)."""
    for cb in listeners(trainer):
        getattr(cb, HOOK)(trainer, source, event_name, reference or {}, columns)


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights of every Linear / Conv2d / Embedding that holds a real
    weight Parameter (fake-quant layers included; PQ / RQ layers have none)."""
    out = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight") if isinstance(m, _FLOAT_TYPES) else None
        if isinstance(w, torch.Tensor):
            out[name] = w.detach().to("cpu", copy=True)
    return out


@contextlib.contextmanager
def event(trainer, source, event_name: str):
    """Context around the code of a quantization event: captures the float weights on entry
    and :func:`notify` s the listeners on a normal exit (an exception propagates untold)."""
    ls = listeners(trainer)
    if not ls or not getattr(trainer, "is_global_zero", True):
        yield
        return
    before = float_weights(trainer.lightning_module)
    yield
    notify(trainer, source, event_name, reference=before)


# ---------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------

@dataclass
class InPlace:
    """A layer a method quantized at an event: the float weight right before it."""

    reference: torch.Tensor
    source: str
    event: str
    bits: int | None = None


@dataclass
class LayerWeights:
    """The float reference W and the computed-with weight Q(W) of one layer."""

    w: torch.Tensor | None
    q: torch.Tensor
    reference: str


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    weights: dict[str, LayerWeights] = field(default_factory=dict)  # only for ``keep``

    @property
    def columns(self) -> list[str]:
        extra = [k for r in self.rows for k in r if k not in COLUMNS]
        return list(COLUMNS) + list(dict.fromkeys(extra))


def source_name(source) -> str:
    name = source if isinstance(source, str) else type(source).__name__
    return re.sub(r"Callback$", "", name) or name


def is_quantized_layer(m: nn.Module) -> bool:
    return is_pq(m) or is_rq(m) or (is_fake_quant(m) and m.weight_quantizer is not None)


def quantized_weight(m: nn.Module) -> torch.Tensor:
    """Q(W) of a quantized layer (module docstring), without side effects on the run."""
    with torch.no_grad():
        if is_pq(m):
            return m.weight_from_codebook().detach()
        if is_rq(m):
            return m.weight_from_stages().detach()
        wq, w = m.weight_quantizer, m.weight.detach()
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            q = copy.deepcopy(wq)
            q.eval()
            q.enabled = True
            fn = getattr(q, "quantized_value", None)
            return (fn(w) if callable(fn) else q(w)).detach()


def _format(m: nn.Module) -> tuple[str, str, int | None, int | None, int | None]:
    """(method, format, bits, n_centroids, block_size) of a quantized layer."""
    if is_pq(m) or is_rq(m):
        k, bs = int(m.n_centroids), int(m.block_size)
        parts = [f"K={k}", f"block={bs}"]
        if is_rq(m):
            parts.append(f"stages={m.n_stages}")
        elif m.n_segments > 1:
            parts.append(f"segments={m.n_segments}")
        return type(m).__name__, " ".join(parts), None, k, bs
    wq = m.weight_quantizer
    parts = []
    for a in _FORMAT_ATTRS:
        v = getattr(wq, a, None)
        if isinstance(v, (bool, int, float, str)) and not isinstance(v, torch.Tensor):
            parts.append(f"{a}={v}")
    k = getattr(wq, "n_centroids", None)
    c = getattr(wq, "centroids", None)
    if k is None and isinstance(c, torch.Tensor) and c.numel():
        k = c.shape[0] if c.dim() else None
    bs = getattr(wq, "block_size", None)
    bits = getattr(wq, "bits", None)
    return (type(wq).__name__, " ".join(parts), bits if isinstance(bits, int) else None,
            int(k) if isinstance(k, int) else None, bs if isinstance(bs, int) else None)


def rel_error(q: torch.Tensor, w: torch.Tensor) -> float:
    """||q - w||_F / ||w||_F (float64 accumulation; NaN for an all-zero w)."""
    w64 = w.detach().to(torch.float64).flatten()
    d = q.detach().to(w64.device, torch.float64).flatten() - w64
    n = float(torch.linalg.vector_norm(w64))
    return float(torch.linalg.vector_norm(d)) / n if n > 0 else float("nan")


def count_levels(q: torch.Tensor) -> int:
    flat = q.detach().flatten()
    if flat.numel() > MAX_LEVEL_ELEMENTS:
        flat = flat[:: math.ceil(flat.numel() / MAX_LEVEL_ELEMENTS)]
    return int(torch.unique(flat).numel())


def layer_report(model: nn.Module, in_place: dict[str, InPlace] | None = None,
                 extra: dict[str, dict] | None = None, keep=()) -> Report:
    """One row per quantized layer of ``model`` (module docstring).

    ``in_place``: layers quantized at an event, with their pre-event float weight (plain
    layers rewritten in place are reported only through it); ``extra``: {column: {layer:
    value}}; ``keep``: layer names whose W and Q(W) are returned in ``Report.weights``."""
    in_place, extra, keep = in_place or {}, extra or {}, set(keep)
    storage = {r.name: r for r in model_storage_bits(model).layers}
    rep = Report()
    for name, m in model.named_modules():
        ip = in_place.get(name)
        if is_quantized_layer(m):
            method, fmt, bits, k, bs = _format(m)
            q = quantized_weight(m)
            if ip is not None:  # PQ / RQ, or converted at the end of fit by its method
                w, ref = ip.reference, f"before {ip.event}"
            elif is_pq(m) or is_rq(m):
                w, ref = None, "none (quantized before this run's events)"
            else:
                w, ref = m.weight.detach(), "float master weight"
        elif ip is not None and isinstance(m, _FLOAT_TYPES):
            q = m.weight.detach()
            w, ref = ip.reference, f"before {ip.event}"
            method, fmt, bits, k, bs = f"{ip.source} (in place)", "", ip.bits, None, None
        else:
            continue
        row = storage.get(name)
        sbits = row.bits if row is not None else None
        params = q.numel()
        r = {"layer": name, "method": method, "format": fmt, "bits": bits, "n_centroids": k,
             "block_size": bs, "params": params, "storage_bits": sbits,
             "bits_per_weight": sbits / params if sbits is not None and params else None,
             "rel_error": rel_error(q, w) if w is not None else float("nan"),
             "levels": count_levels(q), "reference": ref}
        for col, vals in extra.items():
            if name in vals:
                r[col] = vals[name]
        rep.rows.append(r)
        if name in keep:
            rep.weights[name] = LayerWeights(None if w is None else w.detach(), q, ref)
    return rep


def quantized_layer_names(model: nn.Module, in_place: dict | None = None) -> list[str]:
    """Names of the layers :func:`layer_report` reports, in module order."""
    in_place = in_place or {}
    return [n for n, m in model.named_modules()
            if is_quantized_layer(m) or (n in in_place and isinstance(m, _FLOAT_TYPES))]


# ---------------------------------------------------------------------------------------
# output (files only; the callback does the logging)
# ---------------------------------------------------------------------------------------

def write_csv(report: Report, path) -> None:
    import csv

    cols = report.columns
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in report.rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})


def markdown(report: Report) -> str:
    """The table as markdown (TensorBoard's text plugin renders it)."""
    cols = [c for c in report.columns if c != "format"]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in report.rows]
    return "\n".join(lines)


def plot_png(report: Report, path, title: str = "layer report"):
    """Bit map: layers on the vertical axis; left panel the storage bits per weight (the
    code bits marked), right panel the relative quantization error. Returns the Figure
    (closed).

    Drawn once: margins, axis labels and legend are placed by hand (``tight_layout`` and
    matplotlib's automatic label placement each measure every tick label again; together
    they were ~2/3 of the figure's time)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = report.rows
    names = [r["layer"] for r in rows]
    y = list(range(len(rows)))
    h, w = max(2.5, 0.28 * len(rows) + 1.2), 10.0
    with plt.rc_context({"xtick.labelsize": 9, "ytick.labelsize": 7}):  # set before the
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(w, h))  # ticks exist: no restyling
    # left margin: the longest layer name at 7 pt (~0.6 em per character) plus the ticks
    left = min(0.45, (0.6 * 7 / 72 * max((len(n) for n in names), default=1) + 0.15) / w)
    top, bottom = 0.75, 0.55  # inches: suptitle + legend / tick labels + axis label
    fig.subplots_adjust(left=left, right=0.97, top=1 - top / h, bottom=bottom / h,
                        wspace=0.06)
    axes_h = h - top - bottom
    bpw = [r["bits_per_weight"] or 0.0 for r in rows]
    a1.barh(y, bpw, color="tab:blue", label="storage bits / weight")
    code = [(i, r["bits"]) for i, r in zip(y, rows) if r.get("bits") is not None]
    if code:
        a1.plot([b for _, b in code], [i for i, _ in code], "|", color="k", markersize=12,
                label="code bits")
    for i, v in zip(y, bpw):
        a1.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    a1.set_xlim(0, 1.15 * max(bpw, default=0.0) or 1.0)  # room for the value labels
    a1.set_yticks(y, names)
    a1.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    err = [r["rel_error"] if r["rel_error"] == r["rel_error"] else 0.0 for r in rows]
    a2.barh(y, err, color="tab:red")
    for i, r in zip(y, rows):
        e = r["rel_error"]
        a2.text(err[i], i, " n/a" if e != e else f" {e:.3f}", va="center", fontsize=7)
    a2.set_xlim(0, 1.15 * max(err, default=0.0) or 1.0)
    a2.set_yticks([])  # same rows as the left panel (no shared axis: no second tick set)
    for ax, label in ((a1, "bits per weight"), (a2, "||Q(W) - W|| / ||W||")):
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel(label)
        ax.xaxis.set_label_coords(0.5, -0.28 / axes_h)  # below the tick labels, fixed
        ax.yaxis.set_label_coords(-0.01, 0.5)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
