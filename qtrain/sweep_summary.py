"""One table and one picture for a set of runs: ``summary.csv`` (one row per run) and
``pareto.png`` (model size vs. accuracy, the Pareto frontier marked).

:class:`SweepSummary` is a Hydra callback (registered in ``conf/train.yaml``): at the end of a
multirun it writes both into the sweep directory (``multirun/<time>/``) and, if the jobs logged
to wandb, logs them as one extra wandb run (job type ``sweep_summary``, same project; offline
when the jobs were). :mod:`qtrain.compare` makes the same files from any finished runs.

Columns: ``job`` (Hydra's job number in a multirun), ``status`` (as :mod:`qtrain.sweep_status`
reads it: ``finished`` / ``FAILED`` / ``PREEMPTED`` / ``INTERRUPTED`` / ``RUNNING``),
``recipe``, ``overrides`` (the job's command-line overrides, space-separated), ``smoke``, the
final numbers under their logged names (:data:`qtrain.dashboard.SUMMARY_KEYS`:
``test/acc_quant``, ``test/acc_float_master``, ``test/acc_fp32``, ``val/...``,
``size/fp32_mb``, ``size/quant_mb``, ``size/packed_mb``, ``size/compression``,
``size/huffman_mb``; a column only where some run has it), ``epochs``, ``time_s`` (wall time of
the run), ``run_dir``, ``detail`` (the marker's first line for a run that did not finish).
Values are copied from each run's ``summary.json`` unrounded.

The plot: x = model size in MB (``packed_mb``, the real exported file, when the run exported,
else ``quant_mb``, the storage accounting), log scale; y = the quantized model's test metric.
Each run is a dot labelled by what sets it apart (the overrides that differ between the runs,
and the recipe when there are several); each run's FP32 reference (``fp32_mb``,
``test/<m>_fp32``) is a grey star; the frontier (:func:`qtrain.pareto.pareto_front`, over every
point drawn, FP32 included) is the dashed step line through the ringed points. Runs whose task
metrics differ (accuracy and perplexity) get one panel each. The figure is always
``FIG_SIZE`` x ``DPI`` pixels (800 x 600).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

from qtrain.dashboard import SUMMARY_KEYS
from qtrain.errors import DataFileError
from qtrain.pareto import higher_is_better, pareto_front
from qtrain.sweep_status import job_status

CSV_NAME = "summary.csv"
PNG_NAME = "pareto.png"
FIG_SIZE = (8.0, 6.0)  # inches
DPI = 100  # -> 800 x 600 pixels
HEAD = ["job", "status", "recipe", "overrides", "smoke"]
TAIL = ["epochs", "time_s", "run_dir", "detail"]
# overrides that say how a run was run, not what it computed: left out of the plot's labels
QUIET = ("recipe", "debug", "logger", "hydra", "ckpt_path", "trainer.accelerator",
         "trainer.devices")


def _hydra_yaml(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        return (yaml.safe_load(path.read_text()) or {}).get("hydra", {}) or {}
    except yaml.YAMLError:
        return {}


def run_row(run_dir: str | Path) -> dict:
    """One run directory as a row (a dict: column -> value; numbers unrounded)."""
    d = Path(run_dir)
    status, detail = job_status(d)
    summary = {}
    if (d / "summary.json").exists():
        try:
            summary = json.loads((d / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise DataFileError(f"{d / 'summary.json'} is not valid JSON ({e}); "
                                "the run was cut off while writing it") from None
    hy = _hydra_yaml(d)
    overrides = summary.get("overrides")
    if overrides is None:  # runs before summary.json recorded them, and failed runs
        overrides = list((hy.get("overrides") or {}).get("task") or [])
    job = hy.get("job") or {}
    row = {
        "job": job.get("num") if hy.get("mode") == "MULTIRUN" else None,
        "status": status,
        "recipe": summary.get("recipe") or (hy.get("runtime") or {}).get("choices", {}).get(
            "recipe"),
        "overrides": " ".join(str(o) for o in overrides),
        "smoke": summary.get("smoke"),
        "metric": summary.get("metric"),
        "epochs": summary.get("epochs"),
        "time_s": summary.get("time_s"),
        "run_dir": str(d.resolve()),
        "detail": detail,
    }
    m = summary.get("metric") or "metric"
    for key, name in SUMMARY_KEYS.items():
        if summary.get(key) is not None:
            row[name.format(m=m)] = summary[key]
    return row


def is_run_dir(d: Path) -> bool:
    return (d / "summary.json").exists() or (d / ".hydra").is_dir()


def run_dirs_below(root: str | Path) -> list[Path]:
    """The run directories under ``root`` (a multirun's jobs), in job order."""
    root = Path(root)
    found = {p.parent for p in root.rglob("summary.json")}
    found |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}

    def order(d: Path):
        head = d.name.split("_", 1)[0]
        return (str(d.parent), int(head) if head.isdigit() else 1 << 30, d.name)

    return sorted(found, key=order)


def columns(rows: list[dict]) -> list[str]:
    metric_cols: list[str] = []
    for m in dict.fromkeys(r.get("metric") or "metric" for r in rows):
        for name in SUMMARY_KEYS.values():
            col = name.format(m=m)
            if col not in metric_cols and any(col in r for r in rows):
                metric_cols.append(col)
    return HEAD + metric_cols + TAIL


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    cols = columns(rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r[c]) for c in cols})
    os.replace(tmp, path)
    return path


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def labels(rows: list[dict]) -> list[str]:
    """What sets each run apart: the overrides not shared by all runs (the swept values),
    with the recipe when the runs come from several; the run's own overrides otherwise."""
    split = [[o for o in str(r.get("overrides") or "").split()
              if not o.lstrip("+~").startswith(QUIET)] for r in rows]
    shared = set.intersection(*(set(s) for s in split)) if len(split) > 1 else set()
    several = len({r.get("recipe") for r in rows}) > 1
    out = []
    for r, s in zip(rows, split):
        own = [o for o in s if o not in shared] if len(rows) > 1 else s
        parts = ([str(r.get("recipe"))] if several or not own else []) + own
        out.append(" ".join(parts))
    return out


def points(rows: list[dict]) -> dict[str, dict[str, list]]:
    """Per task metric: the runs' (size MB, score, label) and the FP32 references (deduped)."""
    out: dict[str, dict[str, list]] = {}
    for r, lab in zip(rows, labels(rows)):
        m = r.get("metric")
        if not m:
            continue
        q = _float(r.get(f"test/{m}_quant"))
        fp = _float(r.get(f"test/{m}_fp32"))
        size = _float(r.get("size/packed_mb")) or _float(r.get("size/quant_mb"))
        p = out.setdefault(m, {"runs": [], "fp32": []})
        if q is not None and size is not None:
            p["runs"].append((size, q, lab))
        fp_size = _float(r.get("size/fp32_mb"))
        if fp is not None and fp_size is not None:
            if q is None:  # an FP32 recipe: the run is its own FP32 point
                p["runs"].append((fp_size, fp, lab))
            elif (fp_size, fp) not in p["fp32"]:
                p["fp32"].append((fp_size, fp))
    return {m: p for m, p in out.items() if p["runs"] or p["fp32"]}


def plot_pareto(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Draw ``pareto.png`` (module docstring); always ``FIG_SIZE`` at ``DPI``."""
    from qtrain.optional import require

    matplotlib = require("matplotlib", "pareto.png")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    per_metric = points(rows)
    fig = Figure(figsize=FIG_SIZE, dpi=DPI)
    axes = fig.subplots(1, max(1, len(per_metric)), squeeze=False)[0]
    if not per_metric:
        axes[0].text(0.5, 0.5, "no finished run with a size and a test metric",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (m, p) in zip(axes, per_metric.items()):
        up = higher_is_better(m)
        runs, fp32 = p["runs"], p["fp32"]
        if fp32:
            ax.scatter([s for s, _ in fp32], [a for _, a in fp32], marker="*", s=160,
                       color="0.45", zorder=3, label="FP32 reference")
        if runs:
            ax.scatter([s for s, _, _ in runs], [a for _, a, _ in runs], s=36, color="C0",
                       zorder=3, label="run")
            for k, (s, a, lab) in enumerate(sorted(runs)):  # neighbours: above, below
                ax.annotate(lab, (s, a), xytext=(4, 5 if k % 2 == 0 else -11),
                            textcoords="offset points", fontsize=7)
        allp = [(s, a) for s, a, _ in runs] + list(fp32)
        front = [allp[i] for i in pareto_front([s for s, _ in allp], [a for _, a in allp], up)]
        if front:
            ax.step([s for s, _ in front], [a for _, a in front], where="post", ls="--",
                    color="C3", lw=1.2, zorder=2, label="Pareto frontier")
            ax.scatter([s for s, _ in front], [a for _, a in front], s=110, facecolors="none",
                       edgecolors="C3", lw=1.4, zorder=4)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # 0.002, not 2x10^-3
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("model size (MB; packed file if exported, else storage accounting)")
        ax.set_ylabel(f"test {m} of the quantized model ({'higher' if up else 'lower'} "
                      "is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    n_ok = sum(1 for r in rows if r.get("status") == "finished")
    fig.suptitle(title or f"size vs. accuracy: {n_ok} of {len(rows)} runs finished",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def write(rows: list[dict], out_dir: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """``summary.csv`` and ``pareto.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_csv(rows, out / CSV_NAME), plot_pareto(rows, out / PNG_NAME, title)


# ---------------------------------------------------------------------------- wandb


def wandb_target(run_dirs: list[Path]) -> dict | None:
    """The wandb project / entity / mode the runs logged to (from their resolved configs),
    or None if none of them used the wandb logger."""
    import yaml

    for d in run_dirs:
        path = d / "config_resolved.yaml"
        if not path.exists():
            continue
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        wb = (cfg.get("logger") or {}).get("wandb")
        if wb:
            offline = bool(wb.get("offline")) or os.environ.get("WANDB_MODE") == "offline"
            return {"project": wb.get("project"), "entity": wb.get("entity"),
                    "mode": "offline" if offline else None}
    return None


def log_wandb(rows: list[dict], png: str | Path, out_dir: str | Path, name: str,
              project: str | None, entity: str | None = None, mode: str | None = None) -> str:
    """One wandb run (job type ``sweep_summary``) holding the table (``sweep/summary``), the
    picture (``sweep/pareto``) and the run count; its files go under ``<out_dir>/wandb``.
    Returns the wandb run's directory, complete: the wandb service is shut down after the
    run (call it after every other wandb run of the process has finished)."""
    import wandb

    cols = columns(rows)
    table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
    run = wandb.init(project=project, entity=entity, name=name, job_type="sweep_summary",
                     dir=str(out_dir), mode=mode, reinit="create_new",
                     config={"runs": len(rows), "out_dir": str(Path(out_dir).resolve())})
    try:
        run.log({"sweep/summary": table, "sweep/pareto": wandb.Image(str(png))})
        run.summary["sweep/runs"] = len(rows)
        run.summary["sweep/finished"] = sum(r.get("status") == "finished" for r in rows)
        run_dir = run.dir
    finally:
        run.finish()
        wandb.teardown()  # finish() can return before the service wrote the run file out
    return str(Path(run_dir).parent)


# ----------------------------------------------------------------------- the callback


def summarize_sweep(sweep_dir: str | Path) -> tuple[Path, Path | None] | None:
    """Write ``summary.csv`` and ``pareto.png`` for the multirun in ``sweep_dir`` (and log
    them to wandb if its jobs did); None if it holds no job."""
    sweep = Path(sweep_dir)
    dirs = run_dirs_below(sweep)
    if not dirs:
        return None
    rows = [run_row(d) for d in dirs]
    from qtrain.optional import available

    if not available("matplotlib"):  # core install: the table, not the picture (or wandb)
        csv_path = write_csv(rows, sweep / CSV_NAME)
        print(f"sweep summary: {csv_path} (no {PNG_NAME}: it needs matplotlib, "
              'pip install "qtrain[plots]")', file=sys.stderr, flush=True)
        return csv_path, None
    csv_path, png = write(rows, sweep, title=f"sweep {sweep.name}: "
                          f"{sum(r['status'] == 'finished' for r in rows)} of {len(rows)} "
                          "jobs finished")
    print(f"sweep summary: {csv_path}, {png}", file=sys.stderr, flush=True)
    target = wandb_target(dirs)
    if target is not None:
        where = log_wandb(rows, png, sweep, f"sweep_{sweep.name}", **target)
        print(f"sweep summary logged to wandb: {where}", file=sys.stderr, flush=True)
    return csv_path, png


try:  # the callback base is Hydra's; the functions above need only the run files
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class SweepSummary(Callback):
    """Hydra callback: :func:`summarize_sweep` at the end of a multirun. Registered after
    :class:`qtrain.sweep_status.SweepStatus` in ``conf/train.yaml``: Hydra calls
    ``on_multirun_end`` in reverse order, so the summary is written before SweepStatus exits
    with status 1 for a sweep with failed jobs."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        summarize_sweep(config.hydra.sweep.dir)
