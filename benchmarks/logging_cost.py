"""What the dashboards cost (issue 13): the same run with every logging feature on vs off,
side by side, alternating, as separate ``train.py`` processes.

- ``on``:  ``logger=many`` (CSV + TensorBoard: config, per-epoch metrics, final numbers) and
  the per-layer report + weight histograms at start / stages / end (CSV + PNG + logger
  tables / histograms; ``callbacks.layer_report``, the default).
- ``off``: ``logger=csv`` and ``callbacks.layer_report.enabled=false``.

Per run: the child's CPU time (user + sys, ``resource.RUSAGE_CHILDREN``: the measure on a
shared machine), its wall time, ``time_s`` from ``summary.json`` (``train()`` without the
imports) and, with the report on, the CPU time the report itself says it spent
(``report_cpu_s``: the sum of the ``layer report <event>: ... (x s CPU)`` lines of
``train.log``; a direct, low-noise part of the difference). Rounds alternate the order;
``paired`` is the median over rounds of on / off - 1 within a round (robust to the load
drifting between rounds), ``overhead`` the ratio of the medians. Two workloads: the default
recipe (scikit-learn digits) and a short CIFAR-10
ResNet-20 PACT run (needs ``--cifar-root``, the CIFAR pickles).

    python benchmarks/logging_cost.py --rounds 5 [--cifar-root /path/to/cifar10 --cifar-rounds 3] \
        --out benchmarks/logging_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"on": ["logger=many", "callbacks.layer_report.enabled=true"],
         "off": ["logger=csv", "callbacks.layer_report.enabled=false"]}


def workloads(cifar_root: str | None) -> dict[str, list[str]]:
    w = {"qat_int4_digits": ["recipe=qat_int4_digits"]}
    if cifar_root:
        w["pact_resnet20_cifar10_short"] = [
            "recipe=pact_w4a4_resnet20_cifar10", f"data.root={cifar_root}",
            "data.verify_checksums=false", "trainer.max_epochs=2", "quant_start_epoch=1",
            "trainer.limit_train_batches=20", "trainer.limit_val_batches=5",
            "trainer.limit_test_batches=5", "model.channels_last=true"]
    return w


def one_run(args: list[str], run_dir: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                       cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"},
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    log = (Path(run_dir) / "train.log").read_text()
    report = [float(c) for c in re.findall(r"layer report \S+: .*?\(([0-9.]+) s CPU\)", log)]
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "wall_s": wall, "train_s": summary["time_s"], "report_cpu_s": sum(report),
            "report_events": len(report)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cifar-root", default=None)
    ap.add_argument("--cifar-rounds", type=int, default=None, help="default: --rounds")
    ap.add_argument("--out", default="benchmarks/logging_cost.json")
    ap.add_argument("--machine", default="")
    args = ap.parse_args()
    res = {"machine_note": args.machine, "modes": MODES, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, wl in workloads(args.cifar_root).items():
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            rounds = args.rounds if "cifar" not in name or args.cifar_rounds is None \
                else args.cifar_rounds
            for r in range(rounds):
                for m in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                    runs[m].append(one_run(wl + MODES[m], f"{tmp}/{name}_{m}_{r}"))
            med = {m: {k: statistics.median(x[k] for x in v) for k in v[0]}
                   for m, v in runs.items()}
            keys = ("cpu_s", "wall_s", "train_s")
            over = {k: med["on"][k] / med["off"][k] - 1 for k in keys}
            paired = {k: statistics.median(a[k] / b[k] - 1 for a, b in zip(runs["on"], runs["off"]))
                      for k in keys}
            res["workloads"][name] = {"args": wl, "runs": runs, "median": med, "overhead": over,
                                      "paired": paired}
            print(f"{name}: " + ", ".join(f"{k} on {med['on'][k]:.2f}s / off {med['off'][k]:.2f}s "
                                          f"({100 * over[k]:+.1f}%, paired {100 * paired[k]:+.1f}%)"
                                          for k in keys)
                  + f"; report itself {med['on']['report_cpu_s']:.2f}s CPU "
                    f"({med['on']['report_events']:.0f} events)", flush=True)
    res["rounds"] = {"digits": args.rounds, "cifar": args.cifar_rounds or args.rounds}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"medians over the rounds -> {args.out}")


if __name__ == "__main__":
    main()
