"""A Hydra sweeper that searches bit widths and method knobs with Optuna (issue 13 item 5).

``python train.py -m hparams_search=qat_bits_digits`` (or ``hydra/sweeper=qtrain_optuna`` plus
``hydra.sweeper.*``): every trial is a normal qtrain run (its own job dir, summary.json,
checkpoints, loggers) launched through the configured Hydra launcher (local, or SLURM with
``hydra/launcher=slurm``) in batches of ``n_jobs``; Optuna's ask/tell API proposes the next
overrides from the finished trials' ``summary.json``.

- ``objectives``: ``{summary key: maximize|minimize}`` (or a list ``[key:direction, ...]``,
  which replaces the config's on the command line); one key = single objective (TPE by
  default), several = multi-objective (NSGA-II by default), e.g. accuracy vs size.
- ``constraints``: ``{summary key: upper bound}``, e.g. ``{quant_mb: 0.05}`` (a size budget;
  or a list ``['quant_mb<=0.05']``, quoted on the command line):
  Optuna constraints (``value - bound <= 0`` feasible), used by the TPE / NSGA-II samplers
  and by ``best_trial(s)``.
- ``params``: the search space in Hydra's sweep grammar (:mod:`qtrain.search_space`); sweep
  overrides on the command line are searched too, plain overrides are passed to every trial.
- a trial whose run fails (no summary.json) is told FAIL and the search goes on.
- ``reuse_repeats`` (default true): a trial whose parameters an earlier trial already ran
  (samplers re-propose points of small discrete spaces: 4 of the 12 trials of the digits
  search below were repeats) is told that run's result instead of training again -- a
  qtrain run is deterministic given its config and seed. ``n_trials`` counts every trial;
  ``optuna_trials.csv`` marks the reused ones.

- The study is stored in the sweep dir (``optuna_journal.log``, Optuna's journal file; or
  ``storage: <URL>``, or ``storage: memory`` for none): a killed search (Ctrl-C, ``kill -9``,
  preemption) resumes when the same command runs again with ``hydra.sweep.dir=<that dir>``:
  finished trials count towards ``n_trials`` and are not run again, a trial killed mid-run
  is told FAIL (``KILLED`` in the table) and run again with its parameters as the same job
  number -- in its own job dir, from that dir's last checkpoint.

Results in the sweep dir: ``optuna_trials.csv`` (one row per trial: number, state, params,
values, constraint values, job dir) and ``optimization_results.yaml`` (the best feasible
trial, or the Pareto front for several objectives). Hydra's own multirun summary
(``qtrain.sweep_summary``: summary.csv and the Pareto plot) still runs at the end.

The plugin is ours (not ``hydra-optuna-sweeper``, which is not installable here and pins an
old Optuna); it uses only Optuna's public ask/tell API.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import os
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from qtrain import search_space as S
from qtrain.errors import ConfigError

log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "nsga2", "random", "grid")


class QtrainOptunaSweeper(Sweeper):
    def __init__(self, objectives: Any, n_trials: int = 20, n_jobs: int = 1,
                 sampler: str | None = None, seed: int = 0, constraints: Any = None,
                 params: Any = None, study_name: str = "qtrain", storage: str | None = None,
                 reuse_repeats: bool = True):
        from qtrain.optional import require

        require("optuna", "hydra/sweeper=qtrain_optuna (hparams_search=...)")
        self.objectives = S.check_objectives(_plain(objectives))
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ConfigError(f"hydra.sweeper: n_trials={n_trials}, n_jobs={n_jobs}; both >= 1")
        if sampler is not None and sampler not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={sampler!r}; allowed: {SAMPLERS}")
        self.n_trials, self.n_jobs, self.seed = int(n_trials), int(n_jobs), int(seed)
        self.sampler_name = sampler or ("tpe" if len(self.objectives) == 1 else "nsga2")
        self.constraints = S.check_constraints(_plain(constraints))
        self.params = {k: str(v) for k, v in (_plain(params) or {}).items()}
        self.study_name, self.storage = study_name, storage
        self.reuse_repeats = bool(reuse_repeats)
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ----------------------------------------------------------------------------- Optuna
    def _sampler(self, space: dict):
        import optuna

        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler_name == "grid":
            grid = {}
            for k, d in space.items():
                if not isinstance(d, optuna.distributions.CategoricalDistribution):
                    raise ConfigError(f"hydra.sweeper.sampler=grid: {k} must be choice(...)")
                grid[k] = list(d.choices)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            sampler = optuna.samplers.GridSampler(grid, seed=self.seed)
            # its after_trial calls study.stop() once the grid is done, which works only
            # inside study.optimize; this ask/tell loop stops after n_trials (<= grid size)
            sampler.after_trial = lambda *args, **kwargs: None
            return sampler
        cons = _constraints if self.constraints else None
        if self.sampler_name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=self.seed, constraints_func=cons)
        return optuna.samplers.TPESampler(seed=self.seed, constraints_func=cons)

    def _storage(self, sweep_dir: str):
        """Where the study lives. ``storage: null`` (default): a journal file in the sweep dir
        (``optuna_journal.log``), so a killed search resumes when the same command is run
        again with ``hydra.sweep.dir=<that dir>``; ``memory``: in memory only; anything else:
        an Optuna storage URL (e.g. ``sqlite:///study.db``)."""
        if self.storage == "memory":
            return None
        if self.storage:
            return self.storage
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(os.path.join(sweep_dir, "optuna_journal.log")))

    def _rerun(self, study, space: dict, old, num: int, fixed: list[str], sweep_dir: str,
               returns: list, seen: dict) -> list[dict]:
        """A trial a killed search left RUNNING: told FAIL, its parameters asked again and run
        as the same job number, so it lands in its old job dir and continues from that dir's
        last checkpoint (``ckpt_path`` is not part of the dir name)."""
        from optuna.trial import TrialState

        study.tell(old.number, state=TrialState.FAIL)
        killed = _row(study.get_trials(deepcopy=False)[old.number])
        study.enqueue_trial(dict(old.params))
        trial = study.ask(space)
        overrides = list(old.user_attrs.get("overrides") or
                         fixed + [f"{k}={_value(v)}" for k, v in old.params.items()])
        ckpts = sorted(glob.glob(os.path.join(sweep_dir, "*", f"{num}_*", "checkpoints",
                                              "last.ckpt")))
        if ckpts:
            overrides.append(f"ckpt_path={os.path.dirname(os.path.dirname(ckpts[0]))}")
        log.info("Optuna search: trial %d was killed; running it again as trial %d%s",
                 old.number, trial.number, f" from {ckpts[0]}" if ckpts else "")
        trial.set_user_attr("job_num", num)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("rerun_of", old.number)
        self.validate_batch_is_legal([overrides])
        ret = self.launcher.launch([overrides], initial_job_idx=num)[0]
        returns.append(ret)
        job_dir = str(OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir",
                                       default="") or "") if ret.hydra_cfg else ""
        seen[_key(trial.params)] = (job_dir, S.read_summary(job_dir) if job_dir else None)
        return [{**killed, "state": "KILLED"},
                self._tell(study, trial, *seen[_key(trial.params)], reused=False)]

    def _tell(self, study, trial, job_dir: str, summary: dict | None, reused: bool) -> dict:
        """Tell Optuna the trial's result from its run's summary; the trials-table row."""
        from optuna.trial import TrialState

        trial.set_user_attr("job_dir", job_dir)
        trial.set_user_attr("reused", reused)
        if summary is None:
            study.tell(trial, state=TrialState.FAIL)
            return _row(study.get_trials(deepcopy=False)[trial.number], self.objectives,
                    self.constraints)
        values = S.objective_values(summary, self.objectives)
        cons = [float(summary.get(k, float("inf")) or float("inf")) - b
                for k, b in self.constraints.items()]
        trial.set_user_attr("constraint", cons)
        trial.set_user_attr("summary", {k: summary.get(k) for k in self.constraints})
        study.tell(trial, values)
        return _row(study.get_trials(deepcopy=False)[trial.number], self.objectives,
                    self.constraints)

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        assert self.config is not None and self.launcher is not None
        space, fixed = S.split_arguments(arguments, self.params)
        if not space:
            raise ConfigError("hydra.sweeper.params: no search space (give e.g. "
                              "quant.bits: choice(2,3,4,8) or a sweep override on the command line)")
        sweep_dir = self.config.hydra.sweep.dir
        os.makedirs(sweep_dir, exist_ok=True)
        storage = self._storage(sweep_dir)
        earlier = _earlier_trials(storage, self.study_name)
        self.seed += len(earlier)  # a resumed search does not re-propose its first points
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, load_if_exists=True,
            sampler=self._sampler(space),
            directions=[d for d in self.objectives.values()])
        log.info("Optuna search: %d trials, %s, objectives %s, constraints %s, space %s",
                 self.n_trials, self.sampler_name, self.objectives, self.constraints,
                 {k: str(v) for k, v in space.items()})
        rerun = {t.user_attrs.get("rerun_of") for t in earlier}  # killed, then run again
        rows = [{**_row(t, self.objectives, self.constraints),
                 **({"state": "KILLED"} if t.number in rerun else {})}
                for t in earlier if t.state.is_finished()]
        seen: dict[tuple, tuple[str, dict | None]] = {  # params -> (job dir, summary)
            _key(t.params): (t.user_attrs["job_dir"], S.read_summary(t.user_attrs["job_dir"]))
            for t in earlier if t.state.name == "COMPLETE" and t.user_attrs.get("job_dir")}
        returns, asked = [], sum(r["state"] != "KILLED" for r in rows)
        job_idx = 1 + max((t.user_attrs.get("job_num", -1) for t in earlier), default=-1)
        if earlier:
            log.info("Optuna search resumed (%s): %d trials done, %d to go", sweep_dir,
                     asked, max(self.n_trials - asked, 0))
        for t in earlier:  # killed mid-run: told FAIL, then run again in its own job dir
            if not t.state.is_finished() and asked < self.n_trials:
                num = t.user_attrs.get("job_num")
                if num is None:  # a study written before job numbers were recorded: a new dir
                    num, job_idx = job_idx, job_idx + 1
                rows += self._rerun(study, space, t, num, fixed, sweep_dir, returns, seen)
                asked += 1
        while asked < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - asked))]
            keys = [_key(t.params) for t in trials]
            launch: list[int] = []  # params not run before (each once per batch)
            for i, k in enumerate(keys):
                if not (self.reuse_repeats and (k in seen or k in {keys[j] for j in launch})):
                    launch.append(i)
            batch = [fixed + [f"{k}={_value(v)}" for k, v in trials[i].params.items()]
                     for i in launch]
            if batch:
                self.validate_batch_is_legal(batch)
                for n, i in enumerate(launch):  # what a resumed search needs of a killed trial
                    trials[i].set_user_attr("job_num", job_idx + n)
                    trials[i].set_user_attr("overrides", batch[n])
                results = self.launcher.launch(batch, initial_job_idx=job_idx)
                job_idx += len(batch)
            else:
                results = []
            ran = {}
            for i, ret in zip(launch, results):
                job_dir = str(OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir",
                                               default="") or "") if ret.hydra_cfg else ""
                ran[i] = (job_dir, S.read_summary(job_dir) if job_dir else None)
                seen[keys[i]] = ran[i]
                returns.append(ret)
            for i, trial in enumerate(trials):
                job_dir, summary = ran[i] if i in ran else seen[keys[i]]
                rows.append(self._tell(study, trial, job_dir, summary, reused=i not in ran))
            asked += len(trials)
            _write_trials(os.path.join(sweep_dir, "optuna_trials.csv"), rows)
        _write_trials(os.path.join(sweep_dir, "optuna_trials.csv"), rows)
        best = _best(study, self.objectives, self.constraints)
        OmegaConf.save(OmegaConf.create(best), os.path.join(sweep_dir, "optimization_results.yaml"))
        log.info("Optuna search done: %s", best)
        return returns


def _earlier_trials(storage, study_name: str) -> list:
    """The trials a previous run of this search stored (none for a new study)."""
    import optuna

    if storage is None:
        return []
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def _row(t, objectives: dict | None = None, constraints: dict | None = None) -> dict:
    """One optuna_trials.csv row from a stored trial (also for trials of an earlier run)."""
    row = {"number": t.number, "job_dir": t.user_attrs.get("job_dir", ""), **t.params,
           "reused": t.user_attrs.get("reused", False), "state": t.state.name}
    if t.state.name != "COMPLETE":
        return row
    cons = t.user_attrs.get("constraint", [])
    objectives = objectives or {f"value{i}": None for i in range(len(t.values))}
    return {**row, **t.user_attrs.get("summary", {}), **dict(zip(objectives, t.values)),
            "feasible": all(c <= 0 for c in cons)}


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _constraints(trial) -> list[float]:
    return trial.user_attrs.get("constraint", [float("inf")])


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) and "," in v else str(v)


def _feasible(t) -> bool:
    return all(c <= 0 for c in t.user_attrs.get("constraint", []))


def _best(study, objectives: dict, constraints: dict) -> dict:
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE and _feasible(t)]
    out: dict[str, Any] = {"objectives": objectives, "constraints": constraints,
                           "n_trials": len(study.trials), "n_feasible": len(done)}
    if not done:
        out["best"] = None
        return out

    def describe(t):
        return {"number": t.number, "params": dict(t.params),
                "values": dict(zip(objectives, t.values)), "job_dir": t.user_attrs.get("job_dir")}

    if len(objectives) == 1:
        sign = 1 if next(iter(objectives.values())) == "maximize" else -1
        out["best"] = describe(max(done, key=lambda t: sign * t.values[0]))
    else:
        signs = [1 if d == "maximize" else -1 for d in objectives.values()]

        def dominated(a, b):  # b is at least as good everywhere and better somewhere
            pairs = [(s * va, s * vb) for s, va, vb in zip(signs, a.values, b.values)]
            return all(vb >= va for va, vb in pairs) and any(vb > va for va, vb in pairs)

        out["pareto_front"] = [describe(t) for t in done
                               if not any(dominated(t, o) for o in done if o is not t)]
    return out


def _write_trials(path: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
