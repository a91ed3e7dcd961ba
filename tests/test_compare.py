"""``python -m qtrain.compare`` (issue 13, item 4): re-makes summary.csv and pareto.png from
finished runs -- a real multirun dir, run dirs given again by a glob (each run once), runs of
another recipe from a separate invocation (slow) -- and says in one line what is wrong with a
path that holds no summary.json."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from qtrain.compare import main
from tests.hydra_helpers import ROOT
from tests.test_sweep_summary import COLUMNS, ENV_KEYS, png_size, real_sweep

ENV = {**os.environ, **ENV_KEYS}


def compare(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qtrain.compare", *map(str, args)], cwd=cwd,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)


def check_rows(rows, run_dirs):
    """Each row is its run: the same numbers as the run's summary.json."""
    assert [r["run_dir"] for r in rows] == [str(d.resolve()) for d in run_dirs]
    for row, d in zip(rows, run_dirs):
        if not (d / "summary.json").exists():
            assert row["status"] != "finished"
            continue
        s = json.loads((d / "summary.json").read_text())
        assert row["status"] == "finished" and row["recipe"] == s["recipe"]
        assert row["overrides"] == " ".join(s["overrides"])
        m = s["metric"]
        for key, col in COLUMNS.items():
            col = col.replace("acc", m)
            if s.get(key) is None:
                assert row.get(col, "") == "", (col, row)
            else:
                assert float(row[col]) == s[key], (col, row[col], s[key])


def test_compare_remakes_table_from_a_multirun_and_globbed_runs(tmp_path):
    sweep = real_sweep()["sweep"]
    jobs = sorted((sweep / "qat_int4_digits").iterdir())
    # the sweep, then its job 1 again through a quoted glob: each run is one row
    r = compare(sweep, str(sweep / "qat_int4_digits" / "1_*"), "--out", tmp_path / "out",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 runs (2 finished)" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    check_rows(rows, jobs)
    # the same table the sweep's callback wrote at the end of the multirun
    assert rows == list(csv.DictReader(open(sweep / "summary.csv")))
    assert png_size(tmp_path / "out" / "pareto.png") == (800, 600)


def test_path_without_summary_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DataFileError" in err[0] and str(tmp_path / "empty") in err[0]
    assert "no summary.json" in err[0]
    assert not (tmp_path / "o").exists()


def test_unfinished_run_and_empty_glob_are_one_line(tmp_path, capsys):
    failed = real_sweep()["sweep"] / "qat_int4_digits" / "2_quant.bits-12"
    assert main([str(failed), "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(failed) in line and "no summary.json (run status FAILED" in line
    assert main([str(tmp_path / "nothing_*"), "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "nothing_*" in line and "matches no file" in line


@pytest.mark.slow
def test_compare_runs_of_several_recipes(tmp_path):
    """A run of another recipe from a separate invocation next to the multirun's jobs."""
    sweep = real_sweep()["sweep"]
    run = tmp_path / "vq"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "recipe=vq_lenet300_mnist",
                        "debug=smoke", f"hydra.run.dir={run}"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = compare(sweep, run, "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    check_rows(rows, [*sorted((sweep / "qat_int4_digits").iterdir()), run])
    assert [row["recipe"] for row in rows] == ["qat_int4_digits"] * 3 + ["vq_lenet300_mnist"]
    assert png_size(tmp_path / "out" / "pareto.png") == (800, 600)
