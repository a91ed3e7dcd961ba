"""The Optuna bit-width search (issue 13 item 5): Hydra sweep grammar -> Optuna distributions,
the best feasible trial / Pareto front against brute force and Optuna's own, and a real
``train.py -m hparams_search=...`` sweep whose size budget decides the winner."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hydra_plugins.qtrain_optuna_sweeper.qtrain_optuna_sweeper import (  # noqa: E402
    QtrainOptunaSweeper,
    _best,
)
from qtrain import search_space as S  # noqa: E402
from qtrain.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_grammar_to_distributions():
    space, fixed = S.split_arguments(
        ["quant.bits=choice(2,4,8)", "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
         "seed=3"],
        {"quant.act_bits": "range(2,9,2)", "quant_start_epoch": "int(interval(1, 5))",
         "quant.bits": "choice(3)"})
    assert space["quant.bits"] == CategoricalDistribution([2, 4, 8])  # command line wins
    assert space["quant.act_bits"] == IntDistribution(2, 8, step=2)  # Hydra: end excluded
    assert space["quant_start_epoch"] == IntDistribution(1, 5)
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert fixed == ["seed=3"]


@pytest.mark.parametrize("bad", ["shuffle(range(1,4))", "range(5,2)"])
def test_bad_search_space_is_one_config_error(bad):
    with pytest.raises(ConfigError, match="quant.bits"):
        S.split_arguments([f"quant.bits={bad}"], {})


def test_bad_sweeper_settings():
    with pytest.raises(ConfigError, match="maximize"):
        QtrainOptunaSweeper(objectives={"quant_metric": "max"})
    with pytest.raises(ConfigError, match="allowed"):
        QtrainOptunaSweeper(objectives={"quant_metric": "maximize"}, sampler="cmaes")
    with pytest.raises(ConfigError, match="quant_mb<=0.05"):
        S.check_constraints(["quant_mb=0.05"])
    assert S.check_constraints(["quant_mb <= 0.05"]) == {"quant_mb": 0.05}
    assert S.check_objectives(["a:maximize", "b: minimize"]) == {"a": "maximize", "b": "minimize"}
    with pytest.raises(ConfigError, match="no value for 'acc'.*quant_metric"):
        S.objective_values({"quant_metric": 0.9, "recipe": "x"}, {"acc": "maximize"})


def _study(points, directions):
    study = optuna.create_study(directions=directions)
    for i, (values, cons) in enumerate(points):
        study.add_trial(optuna.trial.create_trial(
            params={"quant.bits": i}, distributions={"quant.bits": IntDistribution(0, 99)},
            values=values, user_attrs={"constraint": cons}))
    return study


def test_best_feasible_and_pareto_front_vs_brute_force():
    import random

    rng = random.Random(0)
    pts = [([rng.random(), rng.random()], [rng.random() - 0.3]) for _ in range(60)]
    res = _best(_study(pts, ["maximize", "minimize"]),
                {"acc": "maximize", "mb": "minimize"}, {"mb": 0.3})
    feas = [i for i, (_, c) in enumerate(pts) if c[0] <= 0]
    front = {i for i in feas if not any(
        pts[j][0][0] >= pts[i][0][0] and pts[j][0][1] <= pts[i][0][1] and pts[j][0] != pts[i][0]
        for j in feas)}
    assert {t["number"] for t in res["pareto_front"]} == front and res["n_feasible"] == len(feas)
    # without constraints the front is Optuna's own best_trials
    free = [(v, [-1.0]) for v, _ in pts]
    study = _study(free, ["maximize", "minimize"])
    res = _best(study, {"acc": "maximize", "mb": "minimize"}, {})
    assert {t["number"] for t in res["pareto_front"]} == {t.number for t in study.best_trials}
    # one objective: the best feasible value, not the best overall
    one = [([0.9], [0.5]), ([0.7], [-0.1]), ([0.8], [0.0])]
    assert _best(_study(one, ["maximize"]), {"acc": "maximize"}, {"mb": 1})["best"]["number"] == 2


def test_real_search_the_size_budget_picks_the_winner(tmp_path):
    """A real search over quant.bits {2, 8} that MAXIMISES size under a budget between the
    two models' sizes: only the budget can make the 2-bit model win. Five random trials
    (seed 0 proposes 8, 2, 8, 8, 2) train only the two distinct settings: the repeats are
    told the earlier run's result."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=qat_bits_digits",
           "debug=smoke", "hydra.sweeper.sampler=random", "hydra.sweeper.n_trials=5",
           "~hydra.sweeper.params", "quant.bits=choice(2,8)",
           "hydra.sweeper.objectives=[quant_mb:maximize]",
           "hydra.sweeper.constraints=['quant_mb<=0.0035']", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "optuna_trials.csv")))
    assert [int(r["quant.bits"]) for r in rows] == [8, 2, 8, 8, 2]
    assert [r["reused"] for r in rows] == ["False", "False", "True", "True", "True"]
    assert len({r["job_dir"] for r in rows}) == 2  # two trainings, not five
    assert len(list((sweep / "qat_int4_digits").iterdir())) == 2
    for r in rows:  # the values told to Optuna are the jobs' own summaries
        s = json.load(open(Path(r["job_dir"]) / "summary.json"))
        assert float(r["quant_mb"]) == pytest.approx(s["quant_mb"])
        assert (r["feasible"] == "True") == (s["quant_mb"] <= 0.0035)
    import yaml

    best = yaml.safe_load(open(sweep / "optimization_results.yaml"))["best"]
    assert best["params"]["quant.bits"] == 2
    sizes = {int(r["quant.bits"]): float(r["quant_mb"]) for r in rows[:2]}
    assert sizes[8] > 0.0035 >= sizes[2]  # the budget really separates them


def test_grid_sampler_covers_the_grid_with_ask_tell():
    """sampler=grid: n_trials capped at the grid size, every point asked once, and telling
    the last one does not raise (Optuna's grid sampler calls study.stop(), which ask/tell
    does not allow)."""
    sw = QtrainOptunaSweeper(objectives=["acc:maximize"], sampler="grid", n_trials=10)
    space = {"quant.bits": CategoricalDistribution([2, 8]),
             "quant.act_bits": CategoricalDistribution([4, 8])}
    study = optuna.create_study(direction="maximize", sampler=sw._sampler(space))
    assert sw.n_trials == 4
    seen = set()
    for _ in range(sw.n_trials):
        t = study.ask(space)
        seen.add((t.params["quant.bits"], t.params["quant.act_bits"]))
        study.tell(t, 1.0)
    assert seen == {(2, 4), (2, 8), (8, 4), (8, 8)}


@pytest.mark.slow  # two real searches of 2 digits trainings, one SIGKILLed: ~40 s CPU, 2-4 min wall
def test_killed_search_resumes_from_its_journal_and_the_killed_trials_checkpoint(tmp_path):
    """SIGKILL the whole search while its second trial trains (after that trial's first
    checkpoint); the same command with the same hydra.sweep.dir resumes: the finished trial is
    not run again, the killed one is told FAIL (KILLED in the table) and run again with the
    same parameters in its own job dir from its last checkpoint; n_trials counts it once."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=qat_bits_digits",
           "hydra.sweeper.sampler=random", "hydra.sweeper.n_trials=2", "~hydra.sweeper.params",
           "quant.bits=choice(2,8)", "quant_start_epoch=1", "trainer.max_epochs=6",
           f"hydra.sweep.dir={sweep}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not list(sweep.glob("*/1_*/checkpoints/last.ckpt")):
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (sweep / "optuna_journal.log").exists()
    assert not list(sweep.glob("*/1_*/summary.json"))  # killed before its end
    first_job0 = next(sweep.glob("*/0_*/summary.json")).stat().st_mtime

    q = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert q.returncode == 0, q.stderr[-3000:]
    assert next(sweep.glob("*/0_*/summary.json")).stat().st_mtime == first_job0  # not rerun
    jobs = sorted(d.name for d in sweep.glob("*/*_*") if d.is_dir())
    assert len(jobs) == 2, jobs  # the killed trial finished in its own dir, no third job
    rows = list(csv.DictReader(open(sweep / "optuna_trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "KILLED", "COMPLETE"]
    assert rows[1]["quant.bits"] == rows[2]["quant.bits"] != rows[0]["quant.bits"]
    job1 = next(sweep.glob("*/1_*"))
    assert Path(rows[2]["job_dir"]).resolve() == job1.resolve()
    cfg = (job1 / "config_resolved.yaml").read_text()
    assert f"ckpt_path: {job1}" in cfg  # continued from the killed run's checkpoint
    s = json.load(open(job1 / "summary.json"))
    assert float(rows[2]["quant_metric"]) == pytest.approx(s["quant_metric"])
