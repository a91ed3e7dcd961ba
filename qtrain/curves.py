"""Validation curves of finished (or running) runs in one picture:
``python -m qtrain.curves RUN_DIR=LABEL [RUN_DIR=LABEL ...] --out curves.png``.

Reads each run's ``csv/metrics.csv`` (the CSV logger's file) and plots the validation error
``100 * (1 - val_acc)`` (or ``--metric val_loss``, as is) against training epochs, where the
epoch of a validation row logged at optimizer step ``s`` is ``(s + 1) / steps_per_epoch``
(``--steps-per-epoch``; default: the run's own steps in its first complete epoch). Runs that
validate several times per epoch (``+trainer.val_check_interval=0.25``) give finer curves.
Used for Gupta et al. 2015's Fig. 2 reproduction (docs/img/gupta_fixed16_mnist_fc.png).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from qtrain.errors import DataFileError


def read_curve(run_dir: str | Path, metric: str = "val_acc",
               steps_per_epoch: int | None = None) -> list[tuple[float, float]]:
    """[(epoch, value)] of ``metric`` in ``run_dir/csv/metrics.csv``; for ``val_acc`` the
    value is the error in percent, 100 * (1 - acc)."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        raise DataFileError(f"{path}: no CSV metrics (a run directory logged with logger=csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or metric not in rows[0]:
        have = sorted(rows[0]) if rows else []
        raise DataFileError(f"{path}: no column {metric!r}; columns: {have}")
    if steps_per_epoch is None:  # the last step logged in epoch 0, + 1
        steps = [int(r["step"]) for r in rows if r.get("epoch") == "0" and r.get("step")]
        later = [int(r["step"]) for r in rows if r.get("epoch") not in ("0", "", None) and r.get("step")]
        if not later:
            raise DataFileError(f"{path}: no complete first epoch; pass --steps-per-epoch")
        steps_per_epoch = min(later) if min(later) > max(steps) else max(steps) + 1
    out = []
    for r in rows:
        if r.get(metric) not in ("", None) and r.get("step") not in ("", None):
            v = float(r[metric])
            out.append(((int(r["step"]) + 1) / steps_per_epoch,
                        100.0 * (1.0 - v) if metric == "val_acc" else v))
    return out


def plot(curves: dict[str, list[tuple[float, float]]], path, title: str = "",
         metric: str = "val_acc"):
    """One line per label; returns the Figure."""
    from qtrain.optional import require

    matplotlib = require("matplotlib", "qtrain.curves (the curves PNG)")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)" if metric == "val_acc" else metric)
    if metric == "val_acc":
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qtrain.curves", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR=LABEL")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--metric", default="val_acc")
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    curves = {}
    try:
        for spec in a.runs:
            run, _, label = spec.partition("=")
            curves[label or run] = read_curve(run, a.metric, a.steps_per_epoch)
    except DataFileError as e:
        print(e, file=sys.stderr)
        return 2
    plot(curves, a.out, a.title, a.metric)
    for label, pts in curves.items():
        print(f"{label}: " + ", ".join(f"{e:.2f}:{v:.2f}" for e, v in pts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
