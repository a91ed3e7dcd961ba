"""The GPU campaign's driver (started by benchmarks/gpu_campaign.sh; see that script for the
command): the FP32 CIFAR-10 ResNet-20 at the paper's schedule, then several quantization
recipes fine-tuned from it at once on the same GPU, every run time-boxed, every result written
to ``--out`` as soon as it exists.

Phase 1, ``fp32_resnet20_cifar10`` at He et al. 2016's schedule (sec. 4.2, Table 6: 64k
iterations of batch 128 = 164 epochs of 50k images, SGD lr 0.1 momentum 0.9, /10 at 32k and
48k iterations = epochs 82 and 123, weight decay 1e-4), overriding the recipe's CPU schedule
(30 epochs, cosine, wd 5e-4) and its per-sample loader: in-memory tensor data path
(``data.loader=tensor``), NHWC (the recipe's ``model.channels_last``), bf16 autocast
(``trainer=gpu_bf16mixed``; fp32 master weights; ``--precision`` changes it), cuDNN autotuning,
validation every ``--fp32-val-every`` epochs. Lightning's ``trainer.max_time`` boxes the
training so that the recipes keep their share of the budget: a run cut by it still tests and
writes its summary (the table says at which epoch it stopped).

Phase 2, each recipe of ``--recipes`` (default TTQ, PACT W4A4, LSQ W2A2) concurrently:
``init_from=<the phase-1 run>``, ``quant_start_epoch=0`` (quantized from the first step, as the
papers that fine-tune a trained FP32 model do), cosine from ``--ft-lr`` (0.01: the LSQ paper's
fine-tuning rate; the recipes' 0.1 is for their 200-epoch schedule from scratch) over E epochs,
E = what the time left allows: ``(time left - start-up - tests) / (FP32 epoch time x
--ft-slowdown)``, at most the recipe's own ``trainer.max_epochs``; ``--ft-epochs`` fixes it. The
papers' schedules (TTQ, PACT: ~200 epochs) do not fit a 9-minute box; the table states E.
If phase 1 left no checkpoint, phase 2 starts from the shipped 30-epoch weights
(recipes/weights/fp32_resnet20_cifar10) and says so.

Every run is a real ``python train.py`` process (own process group, own log) with its own
``trainer.max_time`` (graceful: test + summary still run) and a hard deadline (SIGTERM: the run
saves ``last.ckpt`` and leaves ``PREEMPTED``; SIGKILL 15 s later). ``--out`` receives, rewritten
atomically every ``--refresh-s`` seconds and after every run: ``results.md`` (paper vs ours, one
row per run, and a ready ``Measured`` paragraph per recipe), ``results.json``, ``runs.tar.gz``
(every run directory without checkpoints: summary.json, resolved config, CSV metrics, layer
reports, the run's stdout log) and ``fp32_resnet20_cifar10_last.ckpt`` (the phase-1 weights, to
ship as recipes/weights/ if good). A kill at any moment leaves the last refresh.

``--scale tiny`` is the CPU test of the same path (tests/test_gpu_campaign.py): CPU (fp32 unless
``--precision`` says otherwise), batch 32, 2 training batches, 1 epoch per run, 1 validation /
test batch.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtrain.recipes_table import parse as parse_recipe  # noqa: E402  (stdlib only)

FP32 = "fp32_resnet20_cifar10"
DEFAULT_RECIPES = ("ttq_resnet20_cifar10", "pact_w4a4_resnet20_cifar10", "lsq_w2a2_resnet20_cifar10")
#: He et al. 2016, sec. 4.2: 64k iterations x 128 / 50k images = 163.8 epochs; /10 at 32k, 48k
PAPER_EPOCHS, PAPER_MILESTONES, PAPER_WD = 164, (82, 123), 1.0e-4
SHIPPED_FP32 = ROOT / "recipes" / "weights" / FP32
STARTUP_S = 30.0  # python + torch + Lightning import, data load, model build (one process)
TEST_S = 20.0  # end of a run: test passes, layer report, summary
FINAL_S = 10.0  # the last refresh of --out
GRACE_S = 15.0  # SIGTERM -> SIGKILL


@dataclass
class Run:
    name: str
    recipe: str
    role: str  # fp32 | finetune
    overrides: list[str]
    run_dir: Path
    max_epochs: int
    hard_deadline: float
    max_time_s: float | None = None
    schedule: str = ""
    proc: subprocess.Popen | None = None
    start: float | None = None
    end: float | None = None
    rc: int | None = None
    term_sent: float | None = None
    epoch_seen: dict = field(default_factory=dict)  # epoch -> time its checkpoint appeared

    @property
    def log(self) -> Path:
        return self.run_dir.parent / f"{self.name}.log"


def fmt_max_time(seconds: float) -> str:
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"  # Lightning's DD:HH:MM:SS


def common_overrides(a, name: str, max_epochs: int) -> list[str]:
    ov = [f"data.root={a.data_root}", "data.verify_checksums=false", "data.loader=tensor",
          f"trainer.max_epochs={max_epochs}", f"seed={a.seed}",
          f"hydra.run.dir={Path(a.work) / 'runs' / name}", "trainer.enable_progress_bar=false",
          "logger=csv"]
    if a.scale == "tiny":
        return ov + ["trainer=cpu", f"trainer.precision={a.precision}", "data.batch_size=32",
                     "data.eval_batch_size=64", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                     "trainer.log_every_n_steps=1"]
    return ov + ["data.batch_size=128", f"trainer={'gpu_bf16mixed' if a.precision == 'bf16-mixed' else 'gpu'}",
                 f"trainer.precision={a.precision}", "++trainer.benchmark=true",
                 "trainer.log_every_n_steps=50"]


def epoch_time(run: Run) -> float | None:
    """Seconds per training epoch from the times its epoch checkpoints appeared."""
    seen = sorted(run.epoch_seen.items())
    if len(seen) < 2:
        return None
    (e0, t0), (e1, t1) = seen[0], seen[-1]
    return (t1 - t0) / (e1 - e0) if e1 > e0 else None


def watch_epochs(run: Run, now: float) -> None:
    ck = run.run_dir / "checkpoints"
    if not ck.is_dir():
        return
    for p in ck.glob("epoch*-step*.ckpt"):
        try:
            e = int(p.name[5:p.name.index("-")])
        except ValueError:
            continue
        run.epoch_seen.setdefault(e, now)


def launch(run: Run, a, log) -> None:
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
    env.setdefault("OMP_NUM_THREADS", str(a.threads))
    cmd = [sys.executable, "train.py", f"recipe={run.recipe}", *run.overrides]
    with open(run.log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    f = open(run.log, "a")
    run.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                process_group=0)
    f.close()
    run.start = time.time()
    log(f"start {run.name} (pid {run.proc.pid}): max_epochs {run.max_epochs}, max_time "
        f"{run.max_time_s and round(run.max_time_s)} s, hard stop in "
        f"{run.hard_deadline - run.start:.0f} s")


def signal_run(run: Run, sig: int) -> None:
    try:
        os.killpg(run.proc.pid, sig)  # the process group launch() created (pgid = its pid)
    except ProcessLookupError:
        pass


def wait_all(runs: list[Run], a, log, refresh) -> None:
    """Poll until every run has ended: deadlines, epoch progress, periodic refresh of --out."""
    last_refresh = time.time()
    while True:
        now = time.time()
        active = [r for r in runs if r.proc is not None and r.rc is None]
        for r in active:
            watch_epochs(r, now)
            rc = r.proc.poll()
            if rc is not None:
                r.rc, r.end = rc, now
                log(f"end {r.name}: exit {rc} after {now - r.start:.0f} s ({status(r)})")
                refresh()
                last_refresh = now
            elif r.term_sent is None and now >= r.hard_deadline:
                log(f"hard deadline: SIGTERM {r.name}")
                signal_run(r, signal.SIGTERM)
                r.term_sent = now
            elif r.term_sent is not None and now >= r.term_sent + GRACE_S:
                log(f"SIGKILL {r.name}")
                signal_run(r, signal.SIGKILL)
                r.term_sent = math.inf
        if not [r for r in runs if r.proc is not None and r.rc is None]:
            return
        if now - last_refresh >= a.refresh_s:
            refresh()
            last_refresh = now
        time.sleep(a.poll_s)


def status(run: Run) -> str:
    d = run.run_dir
    if run.proc is None:
        return "not started"
    if (d / "summary.json").exists():
        return "finished"
    for marker, text in (("FAILED", "failed"), ("PREEMPTED", "stopped at its hard deadline "
                                                "(last.ckpt kept, no test)"),
                         ("INTERRUPTED", "interrupted")):
        if (d / marker).exists():
            first = (d / marker).read_text().strip().splitlines()
            return f"{text}: {first[0][:300]}" if first and marker == "FAILED" else text
    return "running" if run.rc is None else f"ended without a summary (exit {run.rc})"


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:  # (the logger may be writing its last line)
                if row.get("val_acc"):
                    out[int(float(row["epoch"]))] = float(row["val_acc"])
            except (TypeError, ValueError):
                continue
    return sorted(out.items())


def collect(run: Run) -> dict:
    d = {"name": run.name, "recipe": run.recipe, "role": run.role, "status": status(run),
         "schedule": run.schedule, "max_epochs": run.max_epochs, "max_time_s": run.max_time_s,
         "overrides": run.overrides, "exit": run.rc,
         "wall_s": None if run.start is None else (run.end or time.time()) - run.start,
         "epoch_s": epoch_time(run), "val_acc": val_curve(run.run_dir)}
    s = run.run_dir / "summary.json"
    if s.exists():
        d["summary"] = json.loads(s.read_text())
    try:  # the paper's number only (not the recipe's own CPU schedule that may follow it)
        d["paper"] = parse_recipe(ROOT / "recipes" / f"{run.recipe}.yaml")["paper"]
        d["paper"] = d["paper"].split(" This recipe")[0]
    except OSError:
        d["paper"] = ""
    return d


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def measured_text(r: dict, machine: str, tiny: bool = False) -> str:
    s = r.get("summary")
    curve = r["val_acc"]
    ep = r["epoch_s"]
    speed = f", {ep:.2f} s per epoch" if ep else ""
    if s is None:
        last = f"; last validation {pct(curve[-1][1])} at epoch {curve[-1][0] + 1}" if curve else ""
        return f"no summary ({r['status']}){last}"
    done = s.get("epochs")
    cut = (f" (stopped by its time box after {done} of {r['max_epochs']} epochs)"
           if done is not None and done < r["max_epochs"] else "")
    if r["role"] == "fp32":
        pts = ", ".join(f"{pct(v)} ({e + 1})" for e, v in curve[-4:])
        where = "tiny test data" if tiny else "the 10k test images"
        return (f"{pct(s.get('fp32_metric'))} test ({where}){cut}; val (epoch): {pts}; "
                f"{s.get('time_s', 0):.0f} s run{speed}; {machine}")
    return (f"FP32 start {pct(s.get('fp32_metric'))} -> quantized {pct(s.get('quant_metric'))} "
            f"test (float master weights {pct(s.get('float_weights_metric'))}){cut}; "
            f"{s.get('fp32_mb', 0):.3f} MB -> {s.get('quant_mb', 0):.3f} MB "
            f"({s.get('compression', 0):.1f}x); {s.get('time_s', 0):.0f} s run{speed}; {machine}")


def render_md(meta: dict, rows: list[dict]) -> str:
    machine = meta.get("machine", "?")
    tiny = meta.get("scale") == "tiny"
    lines = [f"# GPU campaign: {meta['started']} ({machine}, scale {meta['scale']})", "",
             f"Budget {meta['budget_s']:.0f} s from the script's start; elapsed "
             f"{meta['elapsed_s']:.0f} s{' (still running)' if not meta.get('done') else ''}. "
             f"Phases: {json.dumps(meta.get('phases', {}))}.", ""]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    lines += ["| run | paper's result | schedule (this campaign) | measured (ours) | status |",
              "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"`{r['name']}`", r["paper"] or "-", r["schedule"], measured_text(r, machine, tiny),
                 r["status"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    lines += ["", "## Measured paragraphs (for the recipe headers)", ""]
    for r in rows:
        cmd = "python train.py recipe=" + r["recipe"] + " " + " ".join(
            o for o in r["overrides"] if not o.startswith(("hydra.run.dir", "data.root")))
        lines += [f"### {r['name']}", "", f"Measured ({machine}, GPU campaign "
                  f"{meta['started']}; {r['schedule']}): {cmd.strip()} data.root=<cifar10 pickles>: "
                  f"{measured_text(r, machine, tiny)}.", ""]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tar_runs(work: Path) -> bytes:
    """Every run directory and log under work/runs, checkpoints and smoke data left out."""
    buf = io.BytesIO()
    runs = work / "runs"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for folder, dirs, files in os.walk(runs):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "smoke_data"))
            for name in sorted(files):
                path = Path(folder) / name
                if name.endswith((".ckpt", ".tmp")):
                    continue
                try:  # a running job may replace or remove a file meanwhile
                    tar.add(path, arcname=str(Path("runs") / path.relative_to(runs)))
                except OSError:
                    continue
    return buf.getvalue()


def refresh_out(a, meta: dict, runs: list[Run]) -> None:
    out = Path(a.out)
    meta["elapsed_s"] = time.time() - a.t0
    rows = [collect(r) for r in runs]
    write_atomic(out / "results.json", json.dumps({"meta": meta, "runs": rows}, indent=1,
                                                  default=str).encode())
    write_atomic(out / "results.md", render_md(meta, rows).encode())
    write_atomic(out / "runs.tar.gz", tar_runs(Path(a.work)))
    fp32 = next((r for r in runs if r.role == "fp32"), None)
    last = fp32.run_dir / "checkpoints" / "last.ckpt" if fp32 else None
    if fp32 is not None and fp32.rc is not None and last.exists():
        write_atomic(out / f"{FP32}_last.ckpt", last.read_bytes())


def plan_fp32(a, now: float, n_recipes: int) -> Run:
    end_all = a.t0 + a.budget_s - FINAL_S
    reserve = a.recipe_reserve_s if n_recipes else 0.0
    deadline = end_all - reserve
    epochs = a.fp32_epochs
    ms = [round(m * epochs / PAPER_EPOCHS) for m in PAPER_MILESTONES]
    name = FP32
    ov = common_overrides(a, name, epochs) + [
        "scheduler=step", f"scheduler.milestones=[{ms[0]},{ms[1]}]", "scheduler.gamma=0.1",
        f"optimizer.weight_decay={PAPER_WD}", "optimizer.lr=0.1", "optimizer.momentum=0.9",
        f"trainer.check_val_every_n_epoch={a.fp32_val_every if a.scale != 'tiny' else 1}"]
    max_time = max(10.0, deadline - now - STARTUP_S - TEST_S)
    ov.append(f"++trainer.max_time={fmt_max_time(max_time)}")
    sched = (f"{epochs} epochs, batch 128, SGD lr 0.1 momentum 0.9 /10 at epochs {ms[0]} and "
             f"{ms[1]}, wd {PAPER_WD:g} (the paper's), {a.precision}, channels_last, tensor "
             f"data path, val every {a.fp32_val_every} epochs"
             + (f"; training time box {max_time:.0f} s" if max_time else ""))
    if a.scale == "tiny":
        sched = "tiny CPU test: 1 epoch x 2 batches of 32"
    return Run(name, FP32, "fp32", ov, Path(a.work) / "runs" / name, epochs, deadline,
               max_time, sched)


def recipe_max_epochs(recipe: str) -> int:
    for ln in (ROOT / "recipes" / f"{recipe}.yaml").read_text().splitlines():
        if ln.strip().startswith("max_epochs:"):
            return int(ln.split(":")[1])
    return 200


def plan_recipes(a, now: float, init: Path, fp32_epoch_s: float | None, meta: dict) -> list[Run]:
    end = a.t0 + a.budget_s - FINAL_S
    train_s = end - now - STARTUP_S - TEST_S
    n = len(a.recipes)
    slow = a.ft_slowdown if a.ft_slowdown else max(2.0, 0.67 * n)
    ep_s = (fp32_epoch_s or a.default_epoch_s) * slow
    meta["recipe_epoch_estimate_s"] = ep_s
    runs = []
    for recipe in a.recipes:
        cap = recipe_max_epochs(recipe)
        epochs = a.ft_epochs or max(1, min(cap, int(train_s / ep_s)))
        ov = common_overrides(a, recipe, epochs) + [
            f"init_from={init}", "quant_start_epoch=0", f"optimizer.lr={a.ft_lr}"]
        max_time = max(10.0, train_s)
        ov.append(f"++trainer.max_time={fmt_max_time(max_time)}")
        sched = (f"fine-tune {epochs} epochs (recipe: {cap}) from {init.name if init != SHIPPED_FP32 else 'the shipped 30-epoch weights'} "
                 f"(init_from, quant_start_epoch=0), the recipe's optimizer and cosine schedule "
                 f"from lr {a.ft_lr}, {a.precision}, {n} runs at once on one GPU"
                 + (f"; time box {max_time:.0f} s" if max_time else ""))
        if a.scale == "tiny":
            sched = f"tiny CPU test: {epochs} epoch x 2 batches of 32 from {init.name}"
        runs.append(Run(recipe, recipe, "finetune", ov, Path(a.work) / "runs" / recipe, epochs,
                        end, max_time, sched))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="run directories (not --out: 8-file limit)")
    ap.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--budget-s", type=float, default=None, help="540 (tiny: 3600)")
    ap.add_argument("--t0", type=float, default=None, help="the campaign's start (epoch s)")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--precision", default=None, choices=("bf16-mixed", "32-true", "16-mixed"),
                    help="bf16-mixed (tiny: 32-true)")
    ap.add_argument("--fp32-epochs", type=int, default=None, help=f"{PAPER_EPOCHS} (tiny: 1)")
    ap.add_argument("--fp32-val-every", type=int, default=4)
    ap.add_argument("--recipe-reserve-s", type=float, default=150.0,
                    help="seconds of the budget kept for phase 2")
    ap.add_argument("--ft-epochs", type=int, default=None,
                    help="0: what the time left allows (the default; tiny: 1)")
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--ft-slowdown", type=float, default=0.0,
                    help="a fine-tuning epoch vs an FP32 epoch (0: max(2, 0.67 x runs))")
    ap.add_argument("--default-epoch-s", type=float, default=2.5,
                    help="FP32 epoch time assumed when phase 1 measured none")
    ap.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refresh-s", type=float, default=20.0)
    ap.add_argument("--poll-s", type=float, default=1.0)
    ap.add_argument("--machine", default="")
    a = ap.parse_args(argv)
    a.t0 = a.t0 or time.time()
    tiny = a.scale == "tiny"
    a.budget_s = a.budget_s or (3600.0 if tiny else 540.0)
    a.fp32_epochs = a.fp32_epochs or (1 if tiny else PAPER_EPOCHS)
    a.precision = a.precision or ("32-true" if tiny else "bf16-mixed")
    a.ft_epochs = a.ft_epochs if a.ft_epochs is not None else (1 if tiny else 0)
    a.recipes = [r for r in a.recipes.split(",") if r]
    for r in [FP32, *a.recipes]:
        if not (ROOT / "recipes" / f"{r}.yaml").exists():
            print(f"error: --recipes: no recipe {r!r} (recipes/*.yaml)", file=sys.stderr)
            return 2
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"started": datetime.datetime.fromtimestamp(a.t0, datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "scale": a.scale, "budget_s": a.budget_s,
            "machine": a.machine or ("CPU (tiny test)" if a.scale == "tiny" else "GPU"),
            "phases": {"setup_s": round(time.time() - a.t0, 1)}, "notes": [], "done": False}
    logf = open(out / "campaign.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - a.t0:7.1f} s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    runs: list[Run] = []

    def refresh() -> None:
        try:
            refresh_out(a, meta, runs)
        except Exception as e:  # a refresh must never end the campaign
            log(f"refresh of {out} failed: {type(e).__name__}: {e}")

    def on_term(signum, frame):
        log(f"signal {signum}: stopping every run, final refresh")
        for r in runs:
            if r.proc is not None and r.rc is None:
                signal_run(r, signal.SIGTERM)
        time.sleep(3)
        meta["notes"].append(f"campaign stopped by signal {signum}")
        refresh()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    # phase 1: the FP32 network at the paper's schedule
    t1 = time.time()
    fp32 = plan_fp32(a, t1, len(a.recipes))
    runs.append(fp32)
    launch(fp32, a, log)
    refresh()
    wait_all(runs, a, log, refresh)
    meta["phases"]["fp32_s"] = round(time.time() - t1, 1)
    ep = epoch_time(fp32)
    meta["fp32_epoch_s"] = ep
    if ep:
        log(f"FP32: {ep:.2f} s per epoch ({fp32.max_epochs} planned)")

    # phase 2: the recipes at once, from the phase-1 weights
    if a.recipes:
        t2 = time.time()
        init = fp32.run_dir
        if not (init / "checkpoints" / "last.ckpt").exists():
            init = SHIPPED_FP32
            meta["notes"].append("phase 1 left no checkpoint: the recipes start from the shipped "
                                 "30-epoch weights (recipes/weights/fp32_resnet20_cifar10, 86.8%)")
            log(meta["notes"][-1])
        recipe_runs = plan_recipes(a, t2, init, ep, meta)
        runs.extend(recipe_runs)
        for r in recipe_runs:
            launch(r, a, log)
        refresh()
        wait_all(runs, a, log, refresh)
        meta["phases"]["recipes_s"] = round(time.time() - t2, 1)
    meta["done"] = True
    refresh()
    log(f"done in {time.time() - a.t0:.0f} s; results in {out}")
    failed = [r.name for r in runs if status(r) != "finished"]
    if failed:
        log(f"runs without a summary: {failed}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
