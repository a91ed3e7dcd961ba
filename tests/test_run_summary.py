"""The run summary's FP32 numbers when a recipe trains in float before quantizing."""

import pytest

from tests.hydra_helpers import run


def test_fp32_phase_is_tested_on_the_test_split(tmp_path):
    # the default recipe on the real digits data, short: one FP32 epoch, then one W4A4 epoch
    short = ["trainer.limit_train_batches=4", "quant_start_epoch=1"]
    s = run(short + ["trainer.max_epochs=2"], tmp_path / "qat")
    assert s["fp32_val_metric"] is not None and s["fp32_metric"] is not None
    # independent reference: the same run stopped after its FP32 epoch ends with the same
    # float weights; its test metric with quantizers off must be the same number
    ref = run(short + ["trainer.max_epochs=1"], tmp_path / "fp32")
    assert ref["float_weights_metric"] is not None
    assert s["fp32_metric"] == pytest.approx(ref["float_weights_metric"], abs=1e-6)
    # and it is not the final float weights' number (the snapshot really was loaded)
    assert s["fp32_metric"] != pytest.approx(s["float_weights_metric"], abs=1e-6)


def test_format_summary_keeps_long_paths_and_flags_smoke():
    from qtrain.report import format_summary

    run_dir = "/a/" + "very_long_directory_name/" * 6 + "2026-11-27_14-34-25"
    s = {"metric": "acc", "fp32_mb": 1.0, "quant_mb": 0.25, "compression": 4.0,
         "run_dir": run_dir, "recipe": "r", "epochs": 2, "time_s": 1.0}
    out = format_summary(s)
    assert run_dir in out and "mode" not in out
    assert len({len(line) for line in out.splitlines()}) == 1  # a rectangular table
    assert "smoke: tiny generated data" in format_summary({**s, "smoke": True})
