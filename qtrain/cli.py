"""How ``train.py`` ends a run: exit status, one clear line for bad input, a marker file.

=====================================  ==========  =======================================
case                                   exit        run directory
=====================================  ==========  =======================================
finished                               0           ``summary.json``
bad input (:class:`QtrainError`)       2           ``FAILED`` (the error line)
any other error (a bug, environment)   1           ``FAILED`` (cause + traceback's end);
                                                   the traceback is printed
SIGTERM / SIGUSR1 (preemption)         143 / 138   ``PREEMPTED`` + ``checkpoints/last.ckpt``
SIGINT (Ctrl-C)                        130         ``INTERRUPTED`` + ``checkpoints/last.ckpt``
killed without warning (SIGKILL, OOM)  -           ``RUNNING`` left behind (its pid is gone)
=====================================  ==========  =======================================

``RUNNING`` is also the run directory's lock (created exclusively, with pid and host): a
second run can never write into a directory in use. In a multirun (``-m``) a failing job
writes its ``FAILED`` and the sweep goes on with the next job (see
:mod:`qtrain.sweep_status`); a stopping signal stops the whole sweep.

The config is checked (:func:`qtrain.validation.check_config`, :mod:`qtrain.config_schema`),
with the optional packages it needs (:func:`qtrain.optional.check_config`) and a dataset folder
that is not there (:func:`qtrain.data.preflight.check_data_root`), before torch and the
training code are imported: bad input costs well under a second, not the seconds of
``import torch`` and Lightning. This module imports neither at import time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from qtrain import optional, validation
from qtrain.data.preflight import check_data_root
from qtrain.errors import ConfigError, QtrainError

LOCK = "RUNNING"
MARKERS = ("FAILED", "PREEMPTED", "INTERRUPTED")
TRACEBACK_LINES = 12  # of a non-user error, kept in FAILED


def user_error(e: BaseException) -> QtrainError | None:
    """The project's validation error behind ``e`` (Hydra wraps errors raised while
    instantiating a config object), if there is one; None for anything else."""
    seen, hops = e, 0
    while seen is not None and hops < 20:
        if isinstance(seen, QtrainError):
            return seen
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return None


def _root(e: BaseException) -> BaseException:
    """The innermost explicit cause (``raise ... from``): Hydra's InstantiationException
    only says which target failed, the cause says why."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def describe(e: BaseException) -> str:
    """One line: type and message of the error (and of its root cause when wrapped)."""
    root = _root(e)
    line = f"{type(root).__name__}: {root}".strip().splitlines()
    text = line[0] if line else type(root).__name__
    if root is not e:
        outer = (str(e).strip().splitlines() or [""])[0]
        text = f"{text} (while: {type(e).__name__}: {outer})"
    return text


def write_marker(run_dir: str, name: str, text: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, os.path.join(run_dir, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rank_zero() -> bool:
    """False in the other processes of a multi-process run (DDP ranks Lightning launches
    re-run train.py into the same run dir; SLURM/torchrun tasks): only rank 0 locks."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(os.environ.get(k, "0") in ("", "0") for k in keys)


def acquire(run_dir: str) -> str | None:
    """Create ``<run_dir>/RUNNING`` exclusively (pid, host, start time). A lock left by a
    process that no longer exists on this host (killed with SIGKILL, out of memory) is taken
    over; a live one -- or one from another host -- is a ConfigError. Other ranks of a
    multi-process run share rank 0's directory and take no lock (None)."""
    os.makedirs(run_dir, exist_ok=True)
    if not _rank_zero():
        return None
    path = os.path.join(run_dir, LOCK)
    host = socket.gethostname()
    job = os.environ.get("SLURM_JOB_ID", "")
    text = (f"pid {os.getpid()} host {host} started {time.strftime('%Y-%m-%d_%H:%M:%S')}"
            + (f" slurm_job {job}" if job else "") + "\n"
            "If this process no longer exists, the run was killed without warning "
            "(SIGKILL, out of memory, node failure); resume from checkpoints/last.ckpt "
            "(ckpt_path=...).\n")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    words = f.readline().split()
                pid, other = int(words[1]), words[3]
                other_job = words[words.index("slurm_job") + 1] if "slurm_job" in words else ""
            except (OSError, ValueError, IndexError):
                pid, other, other_job = None, None, ""
            stale = other == host and pid is not None and not _pid_alive(pid)
            if stale or (job and other_job == job):  # killed, or this SLURM job requeued
                os.remove(path)  # that run is gone; this one takes the directory
                continue
            raise ConfigError(
                f"run directory {run_dir} is in use by another run ({LOCK}: pid {pid} on "
                f"{other}); choose another hydra.run.dir, or delete {path} if that run is "
                "gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    raise ConfigError(f"could not lock the run directory {run_dir} ({path})")


def release(lock: str | None) -> None:
    if lock is None:
        return
    try:
        with open(lock) as f:
            mine = f.read().split()[1] == str(os.getpid())
        if mine:
            os.remove(lock)
    except (OSError, IndexError):
        pass


def _failed_text(e: BaseException, user: QtrainError | None) -> str:
    if user is not None:
        return f"{type(user).__name__}: {user}"
    tb = "".join(traceback.format_exception(e)).rstrip().splitlines()
    return describe(e) + "\n\n" + "\n".join(tb[-TRACEBACK_LINES:])


def _signals():
    from qtrain import signals  # imports pytorch_lightning: only once the config is checked

    return signals


def run_or_report(cfg: DictConfig):
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    with open_dict(cfg):
        cfg.recipe_name = hc.runtime.choices.get("recipe")
    run_dir = cfg.paths.output_dir
    lock = None
    try:
        validation.check_config(cfg)  # before torch is imported: a bad value fails in < 1 s
        optional.check_config(cfg)  # every optional package the run needs is installed
        check_data_root(cfg)  # a dataset folder that is not there (no download)
        bad = None
    except Exception as e:  # reported below as always (lock, FAILED); bad input: torch-free
        bad = e
    try:
        with contextlib.nullcontext() if bad is not None else _signals().handling():
            lock = acquire(run_dir)
            for stale in MARKERS:  # a rerun into the same directory (after a kill)
                if os.path.exists(os.path.join(run_dir, stale)):
                    os.remove(os.path.join(run_dir, stale))
            if bad is not None:
                raise bad
            from qtrain.run import train

            summary = train(cfg)
    except BaseException as e:
        if lock is None and _rank_zero() and isinstance(e, QtrainError):  # another run's dir
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if multirun:
                return None
            sys.exit(2)
        if not isinstance(e, QtrainError) and _signals().is_stop(e):
            signals = _signals()
            marker, rc, msg = signals.outcome(e)
            write_marker(run_dir, marker, f"{marker}: {msg}")
            print(f"{marker.lower()}: {msg} (run dir: {run_dir})", file=sys.stderr, flush=True)
            if multirun and lock is not None:  # the sweep ends here: record this job first
                from qtrain.sweep_status import record

                record(hc.sweep.dir, run_dir)
            sys.exit(rc)
        if not isinstance(e, Exception):  # SystemExit from elsewhere, GeneratorExit
            write_marker(run_dir, "FAILED", describe(e))
            raise
        user = user_error(e)
        write_marker(run_dir, "FAILED", _failed_text(e, user))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if user is None:
            if not multirun:
                raise
            traceback.print_exc()  # the sweep goes on; qtrain.sweep_status records this job
            return None
        print(f"error: {type(user).__name__}: {user}", file=sys.stderr, flush=True)
        if multirun:
            return None
        sys.exit(2)
    finally:
        release(lock)
    q = summary.get("quant_metric")
    return q if q is not None else summary.get("fp32_metric")
