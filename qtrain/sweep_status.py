"""A multirun's record of its jobs (a Hydra callback, registered in ``conf/train.yaml``).

Each job appends one line to ``<sweep dir>/sweep_status.tsv`` when it ends -- job folder,
status (``finished`` / ``FAILED`` / ``PREEMPTED`` / ``INTERRUPTED``) and the marker's first
line -- read from the job's run directory (``summary.json`` or the marker
:mod:`qtrain.cli` wrote), so a failing job is recorded and the sweep goes on with the next
one. At the end of the sweep the file is rewritten in job order, the count is printed, and
the sweep exits with status 1 if any job did not finish. A job stopped by a signal records
itself (:mod:`qtrain.cli`) before the signal ends the whole sweep. The sweep's table and
Pareto picture (``summary.csv``, ``pareto.png``) are :mod:`qtrain.sweep_summary`'s, which reads
each job's status with :func:`job_status`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

FILE = "sweep_status.tsv"
HEADER = "job\tstatus\tdetail\n"
MARKERS = ("FAILED", "PREEMPTED", "INTERRUPTED")


def job_status(run_dir: str | Path) -> tuple[str, str]:
    """(status, detail) of one run directory from its files."""
    d = Path(run_dir)
    for m in MARKERS:
        if (d / m).exists():
            lines = [ln for ln in (d / m).read_text().splitlines() if ln.strip()]
            return m, (lines[0] if lines else "")
    if (d / "summary.json").exists():
        return "finished", ""
    if (d / "RUNNING").exists():
        return "RUNNING", "killed without warning, or still running"
    return "unknown", "no summary.json and no marker"


def record(sweep: str, run_dir: str, fallback: str | None = None) -> None:
    """Append ``run_dir``'s outcome to ``<sweep>/sweep_status.tsv``."""
    status, detail = job_status(run_dir)
    if status == "unknown" and fallback:
        status = fallback  # e.g. an error Hydra caught outside qtrain.cli
    line = f"{os.path.relpath(run_dir, sweep)}\t{status}\t{detail}".replace("\n", " ")
    path = Path(sweep) / FILE
    new = not path.exists()
    with open(path, "a") as f:  # one short append per job: safe with parallel launchers
        f.write((HEADER if new else "") + line + "\n")


class SweepStatus(Callback):
    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        status = getattr(job_return, "status", None)
        record(config.hydra.sweep.dir, config.hydra.runtime.output_dir,
               status.name if status is not None else None)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / FILE
        if config.hydra.mode != RunMode.MULTIRUN or not path.exists():
            return
        rows = [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()]
        rows = [r for r in rows if r[0] != "job"]

        def order(r):
            head = Path(r[0]).name.split("_", 1)[0]
            return (int(head) if head.isdigit() else 1 << 30, r[0])

        rows.sort(key=order)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(HEADER + "".join("\t".join(r) + "\n" for r in rows))
        os.replace(tmp, path)
        bad = [r for r in rows if r[1] != "finished"]
        print(f"sweep: {len(rows) - len(bad)} of {len(rows)} jobs finished; status: {path}",
              file=sys.stderr, flush=True)
        for r in bad:
            print(f"  {r[0]}: {r[1]} {r[2] if len(r) > 2 else ''}", file=sys.stderr, flush=True)
        if bad:
            sys.exit(1)
