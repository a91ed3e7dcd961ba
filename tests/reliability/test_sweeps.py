"""A multirun with one bad job: the failure is recorded, the other job runs, the sweep exits
non-zero, ``multirun/<time>/sweep_status.tsv`` lists each job's outcome, and the job folders
are usable in ``ckpt_path=...`` without quoting (no '=' or ',')."""

from __future__ import annotations

import json

from tests.reliability.procs import train_py


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
