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
