"""Errors: only the project's own validation errors (qtrain.errors.QtrainError) are one line
with exit status 2; anything else keeps its traceback; FAILED records the cause. Config that
can be checked before training is checked before training."""

from __future__ import annotations

import re

import pytest
from hydra.errors import InstantiationException

from qtrain.cli import describe, user_error
from qtrain.errors import ConfigError
from tests.hydra_helpers import run
from tests.reliability.procs import train_py


def test_internal_error_keeps_traceback_and_cause(tmp_path):
    # torch's own ValueError (optimizer constructor): not a validated input -> a traceback
    r = train_py("debug=smoke", "optimizer.lr=-1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" in r.stderr and "Invalid learning rate" in r.stderr
    failed = (tmp_path / "run" / "FAILED").read_text().splitlines()
    assert failed[0].startswith("ValueError: Invalid learning rate: -1"), failed
    assert any(ln.strip().startswith('File "') for ln in failed[1:])  # the traceback's end
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("value, match", [
    ("0", r"trainer\.max_epochs=0 trains nothing: .*fit=false"),
    ("-5", r"trainer\.max_epochs=-5: allowed: a positive integer, or -1"),
])
def test_max_epochs_checked_before_anything_is_built(tmp_path, value, match):
    with pytest.raises(ConfigError, match=match):
        run(["debug=smoke", f"trainer.max_epochs={value}"], tmp_path)
    assert not (tmp_path / "smoke_data").exists() and not (tmp_path / "csv").exists()
    assert not (tmp_path / "summary.json").exists()


def test_max_epochs_zero_without_fit_is_allowed(tmp_path):
    from qtrain.validation import check_config
    from tests.hydra_helpers import compose_cfg

    check_config(compose_cfg(["debug=smoke", "trainer.max_epochs=0", "fit=false"], tmp_path))


@pytest.mark.slow
def test_max_epochs_zero_one_line_rc2_and_failed(tmp_path):
    r = train_py("debug=smoke", "trainer.max_epochs=0", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ConfigError: trainer.max_epochs=0 trains nothing")
    failed = (tmp_path / "run" / "FAILED").read_text()
    assert failed.startswith("ConfigError: trainer.max_epochs=0")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "csv").exists()  # nothing was built


@pytest.mark.slow
def test_negative_max_epochs_keeps_the_cause(tmp_path):
    r = train_py("debug=smoke", "trainer.max_epochs=-5", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    failed = (tmp_path / "run" / "FAILED").read_text()
    assert failed.startswith("ConfigError: trainer.max_epochs=-5: allowed: a positive integer")


def test_group_split_that_does_not_fit_a_layer_fails_before_training(tmp_path):
    # Q-BERT group-wise weights with num_heads=3: the Linear layers' rows do not split in 3;
    # the FP32 phase (quant_start_epoch=1 in smoke mode) must not run first
    with pytest.raises(ConfigError) as e:
        run(["debug=smoke", "quant=groupwise", "quant.weight.num_heads=3"], tmp_path)
    msg = str(e.value)
    assert "quant.weight (GroupwiseQuantizer" in msg and "does not fit layer" in msg
    assert re.search(r"layer \S+ \(weight \(\d+, \d+\)\).* \d+ output rows are not "
                     r"divisible by num_heads=3", msg), msg
    assert not list(tmp_path.rglob("metrics.csv"))  # no training step was logged


def test_user_error_found_behind_hydra_wrapping_and_root_cause_described():
    try:
        try:
            raise ConfigError("quant.bits=12: allowed 2..8")
        except ConfigError as inner:
            raise InstantiationException("Error in call to target 'X'") from inner
    except InstantiationException as e:
        assert str(user_error(e)) == "quant.bits=12: allowed 2..8"
        assert describe(e).startswith("ConfigError: quant.bits=12: allowed 2..8 (while: ")
    try:
        try:
            raise KeyError("layer")
        except KeyError as inner:
            raise InstantiationException("Error in call to target 'X'") from inner
    except InstantiationException as e:
        assert user_error(e) is None  # a KeyError is not a validation error
        assert describe(e).startswith("KeyError: 'layer' (while: InstantiationException")
