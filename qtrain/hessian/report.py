"""Write a per-layer sensitivity table as CSV, JSON and a bar chart (PNG, matplotlib)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("layer", "numel", "method", "curvature", "stderr", "sensitivity", "bits")


def table_columns(rows: Sequence[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    return list(COLUMNS) + extra


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    cols = table_columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return path


def write_json(rows: Sequence[dict], path: Path, meta: dict | None = None) -> Path:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = {"meta": meta or {}, "layers": [{k: clean(v) for k, v in r.items()} for r in rows]}
    path.write_text(json.dumps(data, indent=2))
    return path


def plot_png(rows: Sequence[dict], path: Path, title: str = "Hessian sensitivity"):
    """Bars: |sensitivity| per layer (log scale); markers on a second axis: chosen bits.

    Returns the matplotlib Figure (closed after saving; loggers may still embed it).
    """
    from qtrain.optional import require

    matplotlib = require("matplotlib", "the Hessian sensitivity chart")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in rows]
    sens = [abs(r["sensitivity"]) or 1e-30 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), sens, color="tab:blue", label="|sensitivity|")
    ax.set_yscale("log")
    ax.set_ylabel("|sensitivity| (log)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(range(len(rows)), [r["bits"] for r in rows], "o", color="tab:red", label="bits")
    ax2.set_ylabel("bits")
    ax2.set_ylim(0, max(r["bits"] for r in rows) + 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
