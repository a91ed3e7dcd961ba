"""A multirun with one bad job: the failure is recorded, the other job runs, the sweep exits
non-zero, ``multirun/<time>/sweep_status.tsv`` lists each job's outcome, and the job folders
are usable in ``ckpt_path=...`` without quoting (no '=' or ',')."""

from __future__ import annotations

import json
import signal

import pytest

from tests.reliability.procs import ENDLESS, start, stderr_of, train_py, training_started, wait_for


def test_bad_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    r = train_py("-m", "debug=smoke", "quant.bits=12,4", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    bad, good = sweep / "qat_int4_digits" / "0_quant.bits-12", sweep / "qat_int4_digits" / "1_quant.bits-4"
    assert (bad / "FAILED").read_text().startswith("ConfigError: quant.bits=12")
    assert not (bad / "summary.json").exists()
    assert json.loads((good / "summary.json").read_text())["global_step"] > 0
    rows = [ln.split("\t") for ln in (sweep / "sweep_status.tsv").read_text().splitlines()]
    assert rows[0] == ["job", "status", "detail"]
    assert [r_[:2] for r_ in rows[1:]] == [["qat_int4_digits/0_quant.bits-12", "FAILED"],
                                            ["qat_int4_digits/1_quant.bits-4", "finished"]]
    assert rows[1][2].startswith("ConfigError: quant.bits=12")
    assert "sweep: 1 of 2 jobs finished" in r.stderr
    assert "error: ConfigError: quant.bits=12" in r.stderr


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_records_the_job(tmp_path):
    p = start("-m", *ENDLESS, "quant.bits=4,8", cwd=tmp_path)
    # job folders: <n>_quant.bits-<b>+trainer.max_epochs-1000000
    job = lambda: next(iter((tmp_path / "multirun").glob("*/qat_int4_digits/0_quant.bits-4+*")), None)  # noqa: E731
    wait_for(lambda: job() is not None and training_started(job())(), p,
             what="job 0's first training steps")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 128 + signal.SIGTERM, stderr_of(p)[-3000:]
    sweep = job().parents[1]
    rows = [ln.split("\t") for ln in (sweep / "sweep_status.tsv").read_text().splitlines()]
    assert [r[:2] for r in rows[1:]] == [[f"qat_int4_digits/{job().name}", "PREEMPTED"]]
    assert (job() / "checkpoints" / "last.ckpt").exists()
    assert not list((sweep / "qat_int4_digits").glob("1_*"))  # the sweep stopped
