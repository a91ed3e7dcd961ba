"""Compare finished runs: ``python -m qtrain.compare <dirs or globs> [--out DIR]``.

Each argument is a run directory (it holds ``summary.json``), a multirun directory (every job
below it becomes a row, failed jobs included with their status), or a glob of either (quoted,
so the shell leaves it alone: ``'runs/qat_int4_digits/*'``). Runs may come from separate
invocations and several recipes. Writes ``<out>/summary.csv`` and ``<out>/pareto.png``
(columns and picture: :mod:`qtrain.sweep_summary`); ``--wandb-project`` also logs them as one
wandb run (``WANDB_MODE=offline`` works without network).

A path that is neither -- no ``summary.json`` in it and no run directory below it, or a run
that did not finish -- is one line on stderr naming the path (exit status 2).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from qtrain.errors import DataFileError, QtrainError
from qtrain.sweep_status import job_status
from qtrain.sweep_summary import is_run_dir, log_wandb, run_dirs_below, run_row, write


def expand(args: list[str]) -> list[Path]:
    """The run directories named by ``args`` (dirs or globs), in the order given, each once."""
    out: dict[Path, None] = {}
    for a in args:
        matches = sorted(glob.glob(a)) if glob.has_magic(a) else [a]
        if not matches:
            raise DataFileError(f"{a}: the pattern matches no file or directory")
        for m in matches:
            p = Path(m)
            if not p.is_dir():
                raise DataFileError(f"{p}: not a directory (give a run directory, holding "
                                    "summary.json, or a multirun directory)")
            if (p / "summary.json").exists():
                out[p.resolve()] = None
                continue
            if is_run_dir(p):  # a run of its own that did not finish
                status, detail = job_status(p)
                raise DataFileError(f"{p}: no summary.json (run status {status}"
                                    f"{': ' + detail if detail else ''}); compare needs "
                                    "finished runs")
            below = run_dirs_below(p)
            if not below:
                raise DataFileError(f"{p}: no summary.json in it or in any run directory "
                                    "below it (give a run directory or a multirun directory)")
            for d in below:
                out[d.resolve()] = None
    return list(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qtrain.compare", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run dirs, multirun dirs, or globs of them")
    ap.add_argument("--out", default=".", help="folder for summary.csv and pareto.png "
                    "(default: the current folder)")
    ap.add_argument("--wandb-project", default=None,
                    help="also log the table and the picture as one wandb run in this project")
    a = ap.parse_args(argv)
    try:
        dirs = expand(a.paths)
        rows = [run_row(d) for d in dirs]
        csv_path, png = write(rows, a.out)
    except QtrainError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    n_ok = sum(r["status"] == "finished" for r in rows)
    print(f"{len(rows)} runs ({n_ok} finished): {csv_path}, {png}", flush=True)
    if a.wandb_project:
        where = log_wandb(rows, png, a.out, f"compare_{len(rows)}_runs", a.wandb_project)
        print(f"logged to wandb: {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
