"""Sweeps compare (issue 13, item 4): the Pareto frontier against a brute-force dominance
check; a REAL Hydra multirun (train.py -m in a subprocess, two finished jobs and one failing)
writes summary.csv with each job's summary.json numbers and a valid 800x600 pareto.png; the
summary logged to a real offline wandb run and read back from its run files; the logger
choice stays out of job dirs and wandb run names."""

from __future__ import annotations

import csv
import json
import math
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from qtrain.pareto import pareto_front
from qtrain.sweep_summary import labels, log_wandb, run_dirs_below, run_row
from tests.hydra_helpers import CONF, ROOT

ENV_KEYS = {"WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}
# summary.json key -> CSV column, written out here (not imported) so a wrong mapping fails
COLUMNS = {"quant_metric": "test/acc_quant", "float_weights_metric": "test/acc_float_master",
           "fp32_metric": "test/acc_fp32", "fp32_val_metric": "val/acc_fp32",
           "quant_val_metric": "val/acc_quant", "fp32_mb": "size/fp32_mb",
           "quant_mb": "size/quant_mb", "compression": "size/compression",
           "huffman_mb": "size/huffman_mb", "time_s": "time_s", "epochs": "epochs"}


# ----------------------------------------------------------------- Pareto frontier


def brute_force_front(sizes, scores, maximize=True):
    """O(n^2): i is on the frontier iff no j is no larger, no worse and not identical."""
    s = [a if maximize else -a for a in scores]
    front = set()
    for i in range(len(sizes)):
        if math.isnan(sizes[i]) or math.isnan(s[i]):
            continue
        dominated = any(
            sizes[j] <= sizes[i] and s[j] >= s[i] and (sizes[j], s[j]) != (sizes[i], s[i])
            for j in range(len(sizes)) if j != i and not math.isnan(sizes[j] + s[j]))
        if not dominated:
            front.add(i)
    return front


@pytest.mark.parametrize("maximize", [True, False])
def test_pareto_front_equals_brute_force(maximize):
    rng = random.Random(0)
    for trial in range(400):
        n = rng.randint(0, 30)
        if trial % 2:  # a small integer grid: ties in size, in score and identical points
            sizes = [float(rng.randint(0, 5)) for _ in range(n)]
            scores = [float(rng.randint(0, 5)) for _ in range(n)]
        else:
            sizes = [rng.lognormvariate(0, 1) for _ in range(n)]
            scores = [rng.random() for _ in range(n)]
        if n and trial % 7 == 0:
            scores[rng.randrange(n)] = float("nan")
        got = pareto_front(sizes, scores, maximize)
        assert set(got) == brute_force_front(sizes, scores, maximize), (sizes, scores)
        assert len(got) == len(set(got))
        assert [sizes[i] for i in got] == sorted(sizes[i] for i in got)  # ordered by size


def test_pareto_front_hand_example():
    # (size, acc): b dominates a (smaller, as accurate); c and d are the trade-off
    sizes, accs = [2.0, 1.0, 4.0, 0.5], [0.9, 0.9, 0.95, 0.5]
    assert pareto_front(sizes, accs) == [3, 1, 2]
    assert pareto_front(sizes, [1 - a for a in accs], maximize=False) == [3, 1, 2]


def test_labels_name_what_differs():
    rows = [{"recipe": "a", "overrides": "recipe=a debug=smoke quant.bits=2 seed=1"},
            {"recipe": "a", "overrides": "recipe=a debug=smoke quant.bits=4 seed=1"},
            {"recipe": "b", "overrides": "recipe=b logger=wandb seed=1"}]
    assert labels(rows) == ["a quant.bits=2", "a quant.bits=4", "b"]
    assert labels(rows[:2]) == ["quant.bits=2", "quant.bits=4"]
    assert labels(rows[:1]) == ["quant.bits=2 seed=1"]


# ------------------------------------------------------------------ a real multirun

_SWEEP: dict = {}


def real_sweep() -> dict:
    """``train.py -m recipe=qat_int4_digits debug=smoke quant.bits=2,4,12`` (bits=12 fails
    validation) in a subprocess, once per test session: its result and sweep dir."""
    if not _SWEEP:
        cwd = Path(tempfile.mkdtemp(prefix="qtrain_sweep_"))
        import os

        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m",
                            "recipe=qat_int4_digits", "debug=smoke", "logger=csv",
                            "quant.bits=2,4,12"], cwd=cwd, env={**os.environ, **ENV_KEYS},
                           capture_output=True, text=True, timeout=1800)  # shared CPUs
        (sweep,) = (cwd / "multirun").iterdir()
        _SWEEP.update(proc=r, sweep=sweep)
    return _SWEEP


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_multirun_writes_summary_csv_and_pareto_png():
    s = real_sweep()
    r, sweep = s["proc"], s["sweep"]
    assert r.returncode == 1, r.stderr[-3000:]  # one job failed: the sweep says so
    assert f"sweep summary: {sweep.relative_to(sweep.parents[1])}/summary.csv" in r.stderr
    jobs = sorted((sweep / "qat_int4_digits").iterdir())
    # the logger choice (logger=csv) is not in the job dirs
    assert [j.name for j in jobs] == ["0_quant.bits-2", "1_quant.bits-4", "2_quant.bits-12"]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 3  # one row per job, in job order
    for n, (row, job) in enumerate(zip(rows, jobs)):
        assert row["job"] == str(n) and row["recipe"] == "qat_int4_digits"
        assert row["run_dir"] == str(job.resolve())
        assert f"quant.bits={(2, 4, 12)[n]}" in row["overrides"].split()
    for row, job in zip(rows[:2], jobs[:2]):
        summary = json.loads((job / "summary.json").read_text())
        assert row["status"] == "finished" and row["detail"] == ""
        for key, col in COLUMNS.items():  # exactly the job's numbers (no rounding)
            assert float(row[col]) == summary[key], (col, row[col], summary[key])
        assert row["overrides"] == " ".join(summary["overrides"])
    failed = rows[2]
    assert failed["status"] == "FAILED" and "bits=12" in failed["detail"]
    assert failed["test/acc_quant"] == "" and failed["size/quant_mb"] == ""
    # the picture: a PNG of the documented size, with the grey FP32 star and the red frontier
    png = sweep / "pareto.png"
    assert png_size(png) == (800, 600)
    from PIL import Image

    img = Image.open(png).convert("RGB")
    img.load()
    colors = set(img.getdata())
    assert (214, 39, 40) in colors  # matplotlib C3: the frontier
    assert (31, 119, 180) in colors  # C0: the runs
    assert (115, 115, 115) in colors  # 0.45 grey: the FP32 reference


def test_summary_json_records_overrides():
    sweep = real_sweep()["sweep"]
    job = sweep / "qat_int4_digits" / "1_quant.bits-4"
    summary = json.loads((job / "summary.json").read_text())
    assert summary["overrides"] == ["recipe=qat_int4_digits", "debug=smoke", "logger=csv",
                                    "quant.bits=4"]


def test_rows_from_run_dirs_below_a_sweep():
    sweep = real_sweep()["sweep"]
    dirs = run_dirs_below(sweep)
    assert [d.name for d in dirs] == ["0_quant.bits-2", "1_quant.bits-4", "2_quant.bits-12"]
    assert [run_row(d)["status"] for d in dirs] == ["finished", "finished", "FAILED"]


def test_summary_logged_to_offline_wandb_run(tmp_path, monkeypatch):
    """A real offline wandb run, read back from its own run files."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    sweep = real_sweep()["sweep"]
    rows = [run_row(d) for d in run_dirs_below(sweep)]
    where = Path(log_wandb(rows, sweep / "pareto.png", tmp_path, "sweep_test", "qtrain_test",
                           mode="offline"))
    assert where.name.startswith("offline-run-") and where.parent == tmp_path / "wandb"
    assert_wandb_summary_run(where, sweep)


def assert_wandb_summary_run(where: Path, sweep: Path) -> None:
    (table_file,) = where.glob("files/media/table/sweep/summary_*.table.json")
    table = json.loads(table_file.read_text())
    csv_rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert table["columns"] == list(csv_rows[0].keys())
    assert len(table["data"]) == len(csv_rows) == 3
    col = table["columns"].index("test/acc_quant")
    for got, want in zip(table["data"], csv_rows):
        assert (got[col] if got[col] is not None else "") == (
            float(want["test/acc_quant"]) if want["test/acc_quant"] else "")
    (img,) = where.glob("files/media/images/sweep/pareto_*.png")
    assert png_size(img) == (800, 600)
    (log,) = where.glob("*.wandb")
    assert b"sweep_summary" in log.read_bytes()  # the job type, in wandb's run record
    assert b"sweep/finished" in log.read_bytes()  # the run summary


@pytest.mark.slow
def test_multirun_with_wandb_logs_one_summary_run(tmp_path):
    """The whole path: jobs log to offline wandb, the callback adds one summary run."""
    pytest.importorskip("wandb")
    import os

    env = {**os.environ, **ENV_KEYS, "WANDB_DIR": str(tmp_path),
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "recipe=qat_int4_digits",
                        "debug=smoke", "logger=wandb_offline", "quant.bits=2,4,12"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, r.stderr[-3000:]
    assert_wandb_summary_run(runs[0], sweep)
    assert (sweep / "qat_int4_digits" / "0_quant.bits-2" / "wandb").is_dir()  # the jobs'


# ------------------------------------------------------------ logger out of run names


def test_logger_choice_not_in_run_name():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("train", overrides=["recipe=qat_int4_digits", "logger=wandb_offline",
                                           "logger.wandb.project=mine", "quant.bits=3"],
                       return_hydra_config=True)
    HydraConfig.instance().set_config(full)
    assert full.hydra.job.override_dirname == "quant.bits-3"
    assert OmegaConf.to_container(full.logger, resolve=True)["wandb"]["name"] == \
        "qat_int4_digits_quant.bits-3"
