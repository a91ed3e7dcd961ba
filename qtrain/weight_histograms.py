"""Weight histograms before / after quantization, bounded in cost (issue 13, item 3). Pure:
no logger import; :mod:`qtrain.callbacks.layer_report` logs them.

For at most ``max_layers`` quantized layers (evenly spaced over the model's layer order,
first and last included) a sample of at most ``max_weights`` positions per layer is drawn
with a private ``torch.Generator`` seeded from ``seed`` and the layer name (CRC32), so the
same positions are followed from event to event and the run's own random streams are never
consumed. The float weights W (the reference of :mod:`qtrain.layer_report`) and the
quantized values Q(W) are read at the *same* positions; the plot overlays the float
histogram and the quantized values as one bar per distinct level (the grid is visible).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

MAX_LEVEL_BARS = 256  # more distinct quantized values than this: drawn as a histogram


@dataclass
class WeightSample:
    layer: str
    float_values: np.ndarray | None  # W at the sampled positions (None: no reference)
    quant_values: np.ndarray  # Q(W) at the same positions
    numel: int

    @property
    def levels(self) -> np.ndarray:
        return np.unique(self.quant_values)


def choose_layers(names: list[str], max_layers: int) -> list[str]:
    """At most ``max_layers`` of ``names``, evenly spaced (first and last kept)."""
    if max_layers <= 0 or not names:
        return []
    if len(names) <= max_layers:
        return list(names)
    if max_layers == 1:
        return [names[0]]
    idx = sorted({round(i * (len(names) - 1) / (max_layers - 1)) for i in range(max_layers)})
    return [names[i] for i in idx]


def layer_generator(layer: str, seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(layer.encode())) % (2**63))


def sample_positions(numel: int, max_weights: int, gen: torch.Generator) -> torch.Tensor | None:
    """Flat positions to read (None: all ``numel``): ``max_weights`` positions drawn
    uniformly -- distinct (randperm) for layers up to 4x the sample, else with replacement
    (``randint``: O(max_weights) time and memory whatever the layer size)."""
    if numel <= max_weights:
        return None
    if numel <= 4 * max_weights:
        return torch.randperm(numel, generator=gen)[:max_weights]
    return torch.randint(numel, (max_weights,), generator=gen)


def sample(layer: str, w: torch.Tensor | None, q: torch.Tensor, max_weights: int,
           seed: int) -> WeightSample:
    """W and Q(W) of one layer at the same sampled positions."""
    pos = sample_positions(q.numel(), max_weights, layer_generator(layer, seed))

    def take(t):
        flat = t.detach().flatten()
        if pos is not None:
            flat = flat[pos.to(flat.device)]
        return flat.to("cpu", torch.float32).numpy()

    return WeightSample(layer, None if w is None else take(w), take(q), q.numel())


def plot_png(samples: list[WeightSample], path, title: str = "weights", bins: int = 80):
    """One panel per layer: float histogram (filled) and the quantized values (one bar per
    level, or a step histogram when there are more than MAX_LEVEL_BARS). Returns the Figure
    (closed).

    Drawn once, cheaply: one artist per series (per-bin patches cost ~1 s per figure), fixed
    margins (``tight_layout`` draws twice), fixed title / label positions, one legend
    (matplotlib's automatic ones measure every tick label again; ``loc="best"`` tests
    every data point), plain log-axis tick labels (the default ``10^k`` ones go through
    mathtext, ~1/4 of the figure's time)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

    n = max(1, len(samples))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    height = 2.6 * rows + 0.25  # + a row for the figure's legend at the bottom
    with plt.rc_context({"xtick.labelsize": 7, "ytick.labelsize": 7}):  # before the ticks
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes.flat[n:]:
        ax.axis("off")
    handles = {}
    for ax, s in zip(axes.flat, samples):
        lo = float(np.min(s.quant_values)) if s.float_values is None else float(
            min(s.float_values.min(), s.quant_values.min()))
        hi = float(np.max(s.quant_values)) if s.float_values is None else float(
            max(s.float_values.max(), s.quant_values.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-8, bins + 1)
        if s.float_values is not None:
            handles["float W"] = ax.stairs(
                np.histogram(s.float_values, bins=edges)[0], edges, fill=True,
                color="tab:blue", alpha=0.45)
        lv, cnt = np.unique(s.quant_values, return_counts=True)
        if len(lv) <= MAX_LEVEL_BARS:
            handles["Q(W): a bar per level"] = ax.vlines(lv, 0.8, cnt, color="tab:red",
                                                           linewidth=2.0)
            what = f"{len(lv)} levels"
        else:
            handles[f"Q(W): histogram (> {MAX_LEVEL_BARS} values)"] = ax.stairs(
                np.histogram(s.quant_values, bins=edges)[0], edges, color="tab:red")
            what = f"{len(lv)} values"
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(numticks=5))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_title(f"{s.layer}: {what} ({len(s.quant_values)}/{s.numel} weights)",
                     fontsize=8, y=1.0, pad=3)
        ax.xaxis.set_label_coords(0.5, -0.1)  # no axis labels; skips their auto placement
        ax.yaxis.set_label_coords(-0.1, 0.5)
    if handles:  # one legend for the figure (one per panel: ~10% of the drawing time)
        fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=7,
                   ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06 if cols > 1 else 0.13, right=0.98, bottom=0.55 / height,
                        top=1 - 0.45 / height, wspace=0.25, hspace=0.45)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
